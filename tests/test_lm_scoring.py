"""How a causal LM's answers are scored: likelihood over a closed set, the answer budget, ROUGE-L,
general text and the rise of its perplexity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.lm_scoring import (
    answer_budget,
    choice_loglikelihoods,
    continuation,
    general_blocks,
    generate_answers,
    loss_rise,
    read_general_texts,
    rouge_l,
    shared_prefix,
)


def brute_force(model, prompt: list[int], candidate: list[int]) -> float:
    """One candidate, one forward pass over prompt + candidate, no cache, no padding."""
    ids = torch.as_tensor([prompt + candidate])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(prompt) + j - 1, t] for j, t in enumerate(candidate)))


def test_closed_set_likelihoods_agree_with_a_per_candidate_loop(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    labels = ["red", "green", "blue"]
    questions = ["colour of the sky?", "colour of the grass please now 12?", "apple?"]
    prompts, choices = [], []
    for q in questions:
        # A system prompt every row shares: computed once, each row's own tokens on top.
        messages = [{"role": "system", "content": "answer red, green or blue"}]
        messages.append({"role": "user", "content": q})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        row = []
        for label in labels:
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": label}], tokenize=False
            )
            prompt_ids, cont = continuation(tokenizer, prompt, full)
            row.append(cont)
        prompts.append(prompt_ids)
        choices.append(row)
    assert shared_prefix(prompts) > 5
    # Prompts of different lengths in one batch (padding) and a batch of one.
    for batch_size in (3, 1):
        scores = choice_loglikelihoods(model, prompts, choices, batch_size, tokenizer.pad_token_id)
        expected = [
            [brute_force(model, p, c) for c in row] for p, row in zip(prompts, choices, strict=True)
        ]
        np.testing.assert_allclose(scores, expected, atol=1e-4)


def test_answers_decoded_from_the_scoring_pass_equal_generate(tiny_llama_dir: Path):
    """Greedy answers read off the likelihood pass's cache are transformers' own greedy answers
    (fp32), rows of different lengths and a shared system prompt included."""
    from tasks.lm_scoring import score_prompts, stop_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    questions = ["colour of the sky?", "colour of the grass please now 12?", "apple?", "sea?"]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": q}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    red = tokenizer("red", add_special_tokens=False)["input_ids"]
    stops = stop_ids(model, tokenizer)
    for batch_size in (4, 3):
        scored = score_prompts(
            model, ids, [[red]] * 4, batch_size, tokenizer.pad_token_id, [1, 1, 0, 1], 6, stops
        )
        expected, capped = generate_answers(model, tokenizer, texts, 4, 6)
        assert sorted(scored.answers) == [0, 1, 3]
        for row in (0, 1, 3):
            decoded = tokenizer.decode(scored.answers[row], skip_special_tokens=True).strip()
            assert decoded == expected[row] and scored.capped[row] == capped[row]


def test_greedy_answers_and_the_cap_are_reported(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "colour of the sky?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    answers, capped = generate_answers(model, tokenizer, [prompt, prompt + "x"], 2, 3)
    assert len(answers) == 2 and capped.dtype == bool
    # A random tiny model rarely emits EOS in 3 tokens: it ran to the cap, which is counted.
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert capped[0] == (tokenizer.eos_token_id not in out.tolist())
    assert answers[0] == tokenizer.decode(out, skip_special_tokens=True).strip()


def test_the_answer_budget_follows_the_training_answers(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    short, why = answer_budget("auto", tokenizer, ["red", "blue", "green"] * 10)
    long, _ = answer_budget("auto", tokenizer, ["the sky is blue and the sea is blue too"] * 10)
    assert 4 < short < long <= 512 and "95th percentile" in why
    assert answer_budget(7, tokenizer, ["red"]) == (7, "eval.max_new_tokens")


def test_rouge_l_scores_each_answer_against_its_reference():
    scores = rouge_l(["the sky is blue", "red"], ["the sky is blue", "a green leaf"])
    assert scores[0] == pytest.approx(1.0) and scores[1] == 0.0


def test_general_text_is_cut_into_the_same_blocks_for_every_model(tiny_llama_dir: Path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = tmp_path / "general.txt"
    path.write_text("the sky is blue.\n\nthe grass is green.\n\nan apple is red.\n")
    texts = read_general_texts(str(path), "text")
    assert len(texts) == 3
    blocks = general_blocks(texts * 20, tokenizer, 16, 5)
    assert len(blocks) == 5 and all(len(b) == 16 for b in blocks["input_ids"])
    with pytest.raises(ValueError, match="no column 'body'"):
        read_general_texts(str(path), "body")


def test_the_perplexity_rise_has_a_paired_interval():
    rng = np.random.default_rng(0)
    counts = np.full(50, 10)
    before = rng.uniform(20, 40, 50)
    after = before + 10 * 0.1  # every block 0.1 nats worse: exp(0.1) - 1 = 10.5% higher
    rise, low, high = loss_rise((after, counts), (before, counts), 500, 0)
    assert rise == pytest.approx(np.expm1(0.1)) and low <= rise <= high
    same = loss_rise((before, counts), (before, counts), 500, 0)
    assert same == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)


def test_an_lm_eval_drop_is_relative_to_the_base_with_a_paired_interval():
    from tasks.promote import relative_drop
    from tasks.results import HarnessTask

    before = [1.0] * 40 + [0.0] * 10  # base accuracy 0.8
    after = [1.0] * 30 + [0.0] * 20  # fine-tuned 0.6: 25% lower
    task = HarnessTask(
        name="t",
        metric="acc",
        higher_is_better=True,
        after=0.6,
        before=0.8,
        after_stderr=0.0,
        before_stderr=0.0,
        after_docs=after,
        before_docs=before,
    )
    drop, low, high = relative_drop(task, 500, 0)
    assert drop == pytest.approx(0.25) and low <= drop <= high and low > 0


def test_general_text_and_lm_eval_settings_are_checked_before_anything_trains(tmp_path):
    from tasks.config import load_config
    from tasks.preflight import check_evaluation

    speeches = tmp_path / "speeches.csv"
    speeches.write_text("party,body\nd,we the people\n")
    cfg = load_config(
        None,
        [
            "task=sft",
            f"eval.general_text={speeches}",
            f"eval.lm_eval.include_path={tmp_path / 'tasks'}",
        ],
    )
    problems = check_evaluation(cfg)
    assert any(
        "eval.general_text" in p and "no column 'text'" in p and "body" in p for p in problems
    )
    assert any("eval.lm_eval.include_path" in p for p in problems)
    missing = load_config(None, ["task=sft", f"eval.general_text={tmp_path / 'nope.txt'}"])
    assert check_evaluation(missing) == [
        f"eval.general_text: {tmp_path / 'nope.txt'}: file not found"
    ]


def test_general_text_outside_the_allowed_folders_is_refused_unread(tmp_path, monkeypatch):
    from tasks.config import load_config
    from tasks.preflight import PreflightError, preflight

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "keys.csv"
    secret.write_text("api_key,owner\nxyz,me\n")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("FULLTUNE_ALLOWED_ROOTS", str(allowed))
    cfg = load_config(None, ["task=sft", f"home={allowed / 'home'}", f"eval.general_text={secret}"])
    with pytest.raises(PreflightError) as caught:
        preflight(cfg)
    message = str(caught.value)
    assert "eval.general_text" in message and "outside the deployment's allowed folders" in message
    assert "api_key" not in message  # the file was never read
