"""The SFT kind's parts: formats, answer-only loss masks, packing without cross-talk, the data
contract on instruction data, and how answers are judged."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.config import DataConfig, ModelConfig
from tasks.kinds import get_kind
from tasks.kinds.causal_lm import IGNORE
from tasks.kinds.sft import (
    SFT,
    answer_metrics,
    closed_set,
    detect_format,
    encode_conversation,
    label_ids,
    normalise_answer,
    roles_alternate,
    to_conversation,
)
from tasks.validate import DataValidationError, validate_data

from .conftest import CHATML, colour_rows

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "colour of the sky?"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "and grass?"},
    {"role": "assistant", "content": "green"},
]


def test_every_format_becomes_a_conversation():
    cfg = DataConfig(system_prompt="be brief")
    chat = to_conversation({"messages": json.dumps(CHAT)}, "chat", cfg)
    assert chat == CHAT  # a conversation with its own system turn keeps it
    pc = to_conversation(
        {"prompt": "colour of the sky?", "completion": "blue"}, "prompt-completion", cfg
    )
    assert [m["role"] for m in pc] == ["system", "user", "assistant"]
    alpaca = to_conversation(
        {"instruction": "Name the colour.", "input": "sky", "output": "blue"}, "alpaca", cfg
    )
    assert alpaca[1]["content"] == "Name the colour.\n\nsky" and alpaca[2]["content"] == "blue"
    labelled = to_conversation(
        {"text": "sky", "label": "blue"},
        "labelled",
        DataConfig(prompt_template="Colour of {text}?"),
    )
    assert labelled == [
        {"role": "user", "content": "Colour of sky?"},
        {"role": "assistant", "content": "blue"},
    ]
    custom = DataConfig(format="auto", prompt_column="q", completion_column="a")
    assert detect_format(["q", "a"], custom) == "prompt-completion"
    assert detect_format(["instruction", "output"], DataConfig()) == "alpaca"
    assert detect_format(["messages"], DataConfig()) == "chat"


def test_turns_must_alternate_and_end_with_an_answer():
    assert roles_alternate(CHAT)
    assert not roles_alternate(CHAT[:-1])  # ends on a user turn
    assert not roles_alternate([CHAT[1], CHAT[1], CHAT[2]])


def test_only_answer_tokens_are_trained_and_each_answer_ends_with_eos(tiny_llama_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    encoded = encode_conversation(tokenizer, CHAT, max_length=256, train_on_prompt=False)
    ids, labels = encoded["input_ids"], encoded["labels"]
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    text = tokenizer.decode(trained)
    # Both assistant turns are trained, each with the end-of-turn token that stops generation.
    assert text.replace("\n", "") == "blue<|im_end|>green<|im_end|>"
    assert trained.count(tokenizer.eos_token_id) == 2
    prompt_part = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert "colour of the sky?" in prompt_part and "be brief" in prompt_part
    assert "blue" not in prompt_part
    everything = encode_conversation(tokenizer, CHAT, max_length=256, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]
    cut = encode_conversation(tokenizer, CHAT, max_length=8, train_on_prompt=False)
    assert cut["length"] == 8 and len(cut["input_ids"]) == 8


@pytest.mark.parametrize("row_length", [256, 48])
def test_packed_rows_give_the_same_logits_as_each_conversation_alone(
    row_length: int, tiny_llama_dir: Path
):
    """Positions restart per conversation and transformers masks block-diagonally: no
    conversation in a packed row attends to another (one row, or several of ``row_length``)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    rows = [
        to_conversation(r, "prompt-completion", DataConfig())
        for r in colour_rows(5).to_dict("records")
    ]
    features = [encode_conversation(tokenizer, m, 256, False) for m in rows]
    features = [{k: f[k] for k in ("input_ids", "labels")} for f in features]
    config = ModelConfig(packing=True, max_length=row_length)
    packed = SFT().collator(tokenizer, config, training=True)(features)
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[1] <= row_length
    assert packed["input_ids"].shape[0] == (1 if row_length == 256 else 3)
    # use_cache=False as in training (the Trainer sets it): a KV cache turns packing detection off.
    with torch.no_grad():
        ids, positions = packed["input_ids"], packed["position_ids"]
        together = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        leaky = model(input_ids=ids, use_cache=False).logits
    alone = {
        tuple(f["input_ids"]): model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        for f in features
    }
    found, differs = 0, False
    for r in range(ids.shape[0]):
        starts = [*(positions[r] == 0).nonzero()[:, 0].tolist(), ids.shape[1]]
        for a, b in itertools.pairwise(starts):
            segment = tuple(ids[r, a:b].tolist())
            if segment not in alone:
                continue  # the padding tail of the last row
            found += 1
            torch.testing.assert_close(together[r, a:b], alone[segment], atol=1e-5, rtol=1e-4)
            assert packed["labels"][r, a] == IGNORE  # never a target of the previous conversation
            differs |= a > 0 and not torch.allclose(leaky[r, a:b], alone[segment], atol=1e-3)
    assert found == len(features)
    # Without the restarting positions a later conversation would see the earlier ones.
    assert differs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_contract_reports_every_bad_row_with_file_row_and_rule(
    tiny_llama_dir: Path, tmp_path: Path
):
    good = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(20)
    ]
    bad = [
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
        {
            "messages": [
                {"role": "user", "content": "empty answer"},
                {"role": "assistant", "content": "  "},
            ]
        },
        {"messages": "not a conversation"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", good + bad)
    test = write_jsonl(tmp_path / "test.jsonl", good[:2] + good[2:4])  # leaked prompts
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = DataConfig(train=str(train), test=str(test), max_duplicate_rate=0.0)
    with pytest.raises(DataValidationError) as err:
        validate_data(cfg, tmp_path / "v", get_kind("sft"), tokenizer, 64)
    message = str(err.value)
    assert "train.jsonl" in message and "test.jsonl" in message
    assert "every role is system, user or assistant" in message
    assert "turns alternate user / assistant" in message
    assert "no empty assistant answer" in message
    assert "the row holds a conversation in the configured format" in message
    assert "no prompt shared with the training data (leakage)" in message
    assert "4 of 4 rows fail" in message  # every test prompt also occurs in train


def test_a_template_that_cannot_render_is_a_contract_failure(tiny_llama_dir: Path, tmp_path: Path):
    rows = colour_rows(30)
    path = tmp_path / "pc.csv"
    rows.to_csv(path, index=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(DataValidationError, match="the template raises TemplateError: no chat"):
        validate_data(DataConfig(train=str(path)), tmp_path / "v", get_kind("sft"), tokenizer, 64)
    tokenizer.chat_template = CHATML
    data = validate_data(
        DataConfig(train=str(path)), tmp_path / "w", get_kind("sft"), tokenizer, 64
    )
    clean = pd.read_parquet(data.train_path)
    assert list(clean.columns) == ["text", "messages"]
    assert json.loads(clean["messages"][0])[-1]["role"] == "assistant"


def test_answers_are_judged_after_normalisation_and_against_the_closed_set():
    assert normalise_answer("  Positive. ") == "positive"
    assert closed_set(["red", "Red", "blue", "blue"], None) == ["blue", "red"]
    assert closed_set([f"answer {i}" for i in range(50)], None) == []  # open-ended
    assert label_ids(["Red!", "purple"], ["blue", "red"]).tolist() == [1, -1]
    # A verbose answer counts for the one label it names; naming two is no answer.
    verbose = ["The colour is red.", "red or blue", "Blue, clearly"]
    assert label_ids(verbose, ["blue", "red"]).tolist() == [1, -1, 0]
    m = answer_metrics(["red", "blue", "red"], ["Red.", "purple", "blue"], ["blue", "red"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["outside_label_set"] == pytest.approx(1 / 3)
    assert "macro_f1" in m and "accuracy" not in answer_metrics(["x"], ["x"], [])


@pytest.mark.parametrize("fmt", ["chat", "prompt-completion", "alpaca", "labelled"])
def test_each_format_is_validated_split_and_tokenized(
    fmt: str, tiny_llama_dir: Path, tmp_path: Path
):
    """Generated data in each format goes through the contract, the split and the encoding."""
    from .conftest import prepare

    rows = colour_rows(48)
    if fmt == "chat":
        messages = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            for p, c in zip(rows["prompt"], rows["completion"], strict=True)
        ]
        path = write_jsonl(tmp_path / "data.jsonl", [{"messages": m} for m in messages])
    elif fmt == "alpaca":
        frame = pd.DataFrame(
            {
                "instruction": "Name the colour.",
                "input": rows["prompt"],
                "output": rows["completion"],
            }
        )
        path = tmp_path / "data.jsonl"
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "labelled":
        path = tmp_path / "data.csv"
        rows.rename(columns={"prompt": "text", "completion": "label"}).to_csv(path, index=False)
    else:
        path = tmp_path / "data.parquet"
        rows.to_parquet(path)
    cfg = DataConfig(
        train=str(path),
        format=fmt,
        validation_fraction=0.125,
        test_fraction=0.125,
        prompt_template="{text}",
    )
    _, splits, tokenized = prepare(
        cfg, ModelConfig(name_or_path=str(tiny_llama_dir), max_length=64), tmp_path, "sft"
    )
    assert sum(splits.rows.values()) == 48
    from datasets import load_from_disk

    train = load_from_disk(tokenized.path)["train"]
    for ids, labels in zip(train["input_ids"], train["labels"], strict=True):
        answer = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
        assert 0 < len(answer) < len(ids)  # some tokens trained, the prompt not
    assert ("label" in pd.read_parquet(splits.train_path)) == (fmt == "labelled")


def test_answer_only_logits_give_the_models_own_loss(tiny_llama_dir: Path):
    """The packed training batch asks for logits only where a target follows; the loss read from
    them equals the model's own loss over the whole row."""
    from tasks.kinds.sft import answer_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    rows = [
        to_conversation(r, "prompt-completion", DataConfig())
        for r in colour_rows(4).to_dict("records")
    ]
    features = [encode_conversation(tokenizer, m, 256, False) for m in rows]
    features = [{k: f[k] for k in ("input_ids", "labels")} for f in features]
    batch = SFT().collator(tokenizer, ModelConfig(packing=True, max_length=256), training=True)(
        features
    )
    keep = batch["logits_to_keep"]
    targets = int((batch["labels"][0, 1:] != IGNORE).sum())
    assert batch["input_ids"].shape[0] == 1  # four short conversations: one row
    assert len(keep) == targets < batch["input_ids"].shape[1] // 4  # few positions are answers
    with torch.no_grad():
        common = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        own = model(**common, labels=batch["labels"], use_cache=False).loss
        kept = model(**common, logits_to_keep=keep, use_cache=False)
        full = model(**common, use_cache=False)
    assert kept.logits.shape[1] == targets
    torch.testing.assert_close(answer_loss(kept, batch["labels"]), own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(answer_loss(full, batch["labels"]), own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        answer_loss(kept, batch["labels"], torch.tensor(targets)), own, atol=1e-5, rtol=1e-5
    )
