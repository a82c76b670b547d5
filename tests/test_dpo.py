"""Preference tuning: the pair formats through the contract, the DPO loss against TRL's, and a
flow run from a registered SFT version to a DPO version gated against its parent."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import load_config

from .conftest import COLOURS, colour_rows, tiny_overrides

WRONG = {"red": "green", "green": "blue", "blue": "red"}


def pair_rows(n: int, conversational: bool = False, seed: int = 0) -> pd.DataFrame:
    """The colour questions as preference pairs: the right colour chosen over each wrong one
    (two pairs per question)."""
    rows = []
    for row in colour_rows(n // 2, seed).itertuples():
        right = row.completion
        for wrong in sorted(set(WRONG) - {right}):
            rows.append(pair(row.prompt, right, wrong, conversational))
    return pd.DataFrame(rows)


def pair(prompt: str, right: str, wrong: str, conversational: bool) -> dict[str, str]:
    if conversational:
        return {
            "prompt": json.dumps([{"role": "user", "content": prompt}]),
            "chosen": json.dumps([{"role": "assistant", "content": right}]),
            "rejected": json.dumps([{"role": "assistant", "content": wrong}]),
        }
    return {"prompt": prompt, "chosen": right, "rejected": wrong}


def dpo_overrides(model: str, data: Path, home: Path) -> list[str]:
    return [
        *[o for o in tiny_overrides(Path(model), data, home, task="sft") if o != "task=sft"],
        f"model.name_or_path={model}",
        "task=dpo",
        "registry.model_name=tiny-chat-dpo",
    ]


def check(overrides: list[str]):
    args = ["check"]
    for item in overrides:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "conversational"])
def test_each_pair_format_passes_the_contract(tiny_llama_dir: Path, tmp_path: Path, conversational):
    data = tmp_path / "pairs.csv"
    pair_rows(48, conversational).to_csv(data, index=False)
    result = check(dpo_overrides(str(tiny_llama_dir), data, tmp_path / "home"))
    assert result.exit_code == 0, result.output
    assert "ok: the settings and the data contract pass (dpo)" in result.output


def test_bad_pairs_are_named_by_row_and_rule(tiny_llama_dir: Path, tmp_path: Path):
    data = tmp_path / "pairs.csv"
    frame = pair_rows(48)
    frame.loc[3, "rejected"] = frame.loc[3, "chosen"]  # the same answer twice
    frame.loc[7, "rejected"] = "   "
    frame.to_csv(data, index=False)
    result = check(dpo_overrides(str(tiny_llama_dir), data, tmp_path / "home"))
    assert result.exit_code == 1, result.output
    assert "the chosen and the rejected answer differ" in result.output
    assert "no empty rejected answer" in result.output
    assert "row 3" in result.output and "row 7" in result.output
    missing = check(
        [*dpo_overrides(str(tiny_llama_dir), data, tmp_path / "h2"), "data.rejected_column=worse"]
    )
    assert missing.exit_code == 1
    assert "data.rejected_column: required column 'worse'" in missing.output


def test_the_dpo_loss_is_trls_on_the_same_batch(tiny_llama_dir: Path, tmp_path: Path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tasks.kinds.dpo import chosen_nll, dpo_loss, sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"colour of the {thing}?"}],
            "chosen": [{"role": "assistant", "content": colour}],
            "rejected": [{"role": "assistant", "content": WRONG[colour]}],
        }
        for thing, colour in sorted(COLOURS.items())
    ]
    for loss_type, sft_weight in (("hinge", 0.0), ("sigmoid", 0.0), ("sigmoid", 0.7)):
        policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        args = DPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=0.2,
            loss_type=[loss_type, "sft"] if sft_weight else [loss_type],
            loss_weights=[1.0, sft_weight] if sft_weight else None,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            max_length=64,
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=copy.deepcopy(policy),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        torch.manual_seed(0)
        with torch.no_grad():  # the policy moves away from the reference: the loss is not log 2
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        batch = next(iter(trainer.get_train_dataloader()))
        theirs = trainer.compute_loss(trainer.model, dict(batch))
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        with torch.no_grad():
            ref = sequence_logps(
                trainer.ref_model, batch["input_ids"], batch["attention_mask"], labels
            )
            ours_logps = sequence_logps(
                trainer.model, batch["input_ids"], batch["attention_mask"], labels
            )
        chosen, rejected = ours_logps.chunk(2)
        ours = dpo_loss(chosen, rejected, *ref.chunk(2), beta=0.2, loss_type=loss_type)
        ours = ours + sft_weight * chosen_nll(ours_logps, (labels[:, 1:] != -100).sum(-1))
        assert abs(float(ours) - float(theirs)) < 1e-5, (loss_type, float(ours), float(theirs))
        assert abs(float(ours) - 0.6931) > 1e-3 or loss_type == "hinge"


def encoded_pairs(tokenizer, questions: list[tuple[str, str, str]], limit: int) -> list[dict]:
    """(prompt, chosen, rejected) questions encoded as the DPO kind's pair rows."""
    from tasks.kinds.sft import encode_conversation

    features = []
    for prompt, right, wrong in questions:
        turns = [{"role": "user", "content": prompt}]
        a, b = (
            encode_conversation(
                tokenizer, [*turns, {"role": "assistant", "content": x}], limit, False
            )
            for x in (right, wrong)
        )
        features.append(a | {"rejected_input_ids": b["input_ids"], "rejected_labels": b["labels"]})
    return features


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_pairs_prompt_computed_once_scores_as_two_rows(tiny_llama_dir: Path, attention: str):
    """One row per pair (the prompt once, the rejected answer blind to the chosen) gives each
    answer the log-probability it has in its own padded row, and the same gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.config import ModelConfig
    from tasks.kinds.dpo import PairBatches, pair_batch_logps, sequence_logps, unshared

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attention)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # Prompts of different lengths, answers of several tokens, one answer a prefix of the other.
    questions = [
        ("colour of the sky?", "blue", "green"),
        ("what colour is grass, in one word or two, please?", "green", "green and red"),
        ("and blood?", "red, deep red", "blue"),
    ]
    limit = ModelConfig(name_or_path=str(tiny_llama_dir), max_length=64).tokens()
    features = encoded_pairs(tokenizer, questions, limit)
    batch = PairBatches(int(tokenizer.pad_token_id or 0))(features)
    rows = sum(len(f["input_ids"]) + len(f["rejected_input_ids"]) for f in features)
    assert int((batch["branches"] >= 0).sum()) < rows  # the prompts are not computed twice
    shared = pair_batch_logps(model, batch)
    shared.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    two_rows = sequence_logps(model, *unshared(batch))
    two_rows.sum().backward()
    assert torch.allclose(shared, two_rows, atol=1e-4), (shared, two_rows)
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-4), name
    assert batch["answer_tokens"].tolist() == [
        int((torch.tensor(f[key]) != -100).sum())
        for key in ("labels", "rejected_labels")
        for f in features
    ]


def test_held_out_pairs_of_closed_set_answers_reuse_the_judgings_scores(tiny_llama_dir: Path):
    """A held-out pair whose two answers are labels of the closed set takes its log-probabilities
    from the judging's choice scores, and they are the ones its own pass gives; a pair with an
    answer outside the set is left to that pass."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.config import ModelConfig
    from tasks.kinds.dpo import judged_pairs, pair_logps
    from tasks.kinds.sft import HeldOut, Questions

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    limit = ModelConfig(name_or_path=str(tiny_llama_dir), max_length=64).tokens()
    questions = [
        ("colour of the sky?", "blue", "green"),
        ("what colour is grass, in one word?", "green", "red"),
        ("and blood?", "red", "a deep maroon"),
    ]
    features = encoded_pairs(tokenizer, questions, limit)
    asked = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": right}]
        for q, right, _ in questions
    ]
    question = Questions.of(tokenizer, asked, np.arange(0), ["red", "green", "blue"], limit)
    judged = question.judge(model, None, None, 2, 0)
    test = Dataset.from_list(features)
    policy, reference, known = judged_pairs(test, HeldOut(np.arange(3), question, judged, judged))
    assert known.tolist() == [True, True, False]
    own = pair_logps(model, test, int(tokenizer.pad_token_id or 0), 2)
    assert np.allclose(policy[known], own[known], atol=1e-4), (policy, own)
    assert np.array_equal(policy, reference)
    # A pair whose answers max_length cut off entirely scores 0, alone in its batch too.
    cut = [dict(f, labels=[-100] * len(f["labels"])) for f in features[:1]]
    cut[0]["rejected_labels"] = [-100] * len(cut[0]["rejected_labels"])
    pad = int(tokenizer.pad_token_id or 0)
    assert pair_logps(model, Dataset.from_list(cut), pad, 2).tolist() == [[0.0, 0.0]]


@pytest.fixture(scope="module")
def sft_then_dpo(tiny_llama_dir: Path, tmp_path_factory, prefect_harness):
    """A short SFT run registers tiny-chat v1; a DPO run starts from it by its alias."""
    from flows.finetune import finetune

    work = tmp_path_factory.mktemp("dpo")
    home = work / "home"
    sft_data = work / "colours.csv"
    colour_rows(96).to_csv(sft_data, index=False)
    sft_cfg = load_config(
        None, [*tiny_overrides(tiny_llama_dir, sft_data, home, task="sft"), "train.max_steps=4"]
    )
    sft = finetune(config=sft_cfg)
    pairs = work / "pairs.jsonl"
    pair_rows(320, seed=1).to_json(pairs, orient="records", lines=True)
    cfg = load_config(
        None,
        [
            *dpo_overrides("models:/tiny-chat@challenger", pairs, home),
            "train.max_steps=100",
            "train.learning_rate=0.01",
            "train.beta=0.1",
            "train.dpo_sft_weight=0.2",
        ],
    )
    dpo = finetune(config=cfg)
    # A run that barely moves (a tiny learning rate) does not beat its parent.
    flat = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"learning_rate": 1e-7, "max_steps": 4}),
            "registry": cfg.registry.model_copy(update={"model_name": "tiny-chat-dpo-flat"}),
        }
    )
    return cfg, sft, dpo, finetune(config=flat)


pytestmark = pytest.mark.flow


def test_dpo_learns_the_preference_and_beats_its_parent(sft_then_dpo):
    _, _, dpo, _ = sft_then_dpo
    assert dpo.metrics["preference_accuracy"] > 0.6, (dpo.metrics, dpo.baseline)
    assert dpo.metrics["logratio_margin"] > 0
    assert dpo.metrics["chosen_logp_change"] > 0  # the answer-likelihood term holds it up
    # Judged as SFT is, on the held-out prompts, against its parent on the same rows.
    assert dpo.metrics["accuracy"] > dpo.baseline["accuracy"], (dpo.metrics, dpo.baseline)
    assert dpo.decision is not None and dpo.decision.promoted, dpo.decision


def test_a_dpo_run_that_does_not_beat_its_parent_is_not_champion(sft_then_dpo):
    cfg, _, _, flat = sft_then_dpo
    assert flat.decision is not None and not flat.decision.promoted
    assert "its parent" in flat.decision.reason, flat.decision.reason
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    version = client.get_model_version(flat.model.name, flat.model.version)
    assert version.aliases == ["challenger"]


def test_the_dpo_version_names_its_parent(sft_then_dpo):
    cfg, sft, dpo, _ = sft_then_dpo
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    version = client.get_model_version(dpo.model.name, dpo.model.version)
    parent = f"models:/tiny-chat/{sft.model.version}"
    assert version.tags["lineage.parent_model"] == parent
    assert version.tags["lineage.parent_run_id"] == sft.mlflow_run_id
    assert parent in (version.description or "")  # the model card's base model
    run = client.get_run(dpo.mlflow_run_id)
    assert run.data.tags["lineage.parent_model"] == parent
    assert run.data.metrics["train/tensors_updated_fraction"] == 1.0
    result = CliRunner().invoke(
        app,
        [
            "lineage",
            f"models:/tiny-chat-dpo/{dpo.model.version}",
            "--tracking-uri",
            cfg.tracking_uri(),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"models:/tiny-chat-dpo/{dpo.model.version} <- {parent} <- " in result.output


def test_the_dpo_version_answers_through_predict(sft_then_dpo):
    cfg, _, dpo, _ = sft_then_dpo
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "-m",
            f"models:/{dpo.model.name}@champion",
            "-t",
            "colour of the sky now please 3?",
            "--tracking-uri",
            cfg.tracking_uri(),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip()  # a tiny model's greedy answer: any text, from the chat model


def test_a_registry_uri_that_does_not_resolve_is_refused_with_the_names_found(
    sft_then_dpo, tmp_path: Path
):
    cfg, _, _, _ = sft_then_dpo
    data = tmp_path / "pairs.csv"
    pair_rows(24).to_csv(data, index=False)
    overrides = [
        *dpo_overrides("models:/tiny-chat@gold", data, Path(cfg.home)),
    ]
    result = check(overrides)
    assert result.exit_code == 1
    assert "model.name_or_path: models:/tiny-chat@gold: no such registered version" in result.output
    assert "tiny-chat (@" in result.output


def test_pairs_come_from_the_champions_own_mistakes(sft_then_dpo, tiny_llama_dir, tmp_path):
    cfg, sft, _, _ = sft_then_dpo
    data = tmp_path / "colours.csv"
    colour_rows(40, seed=7).to_csv(data, index=False)
    out = tmp_path / "pairs.jsonl"
    model = f"models:/tiny-chat/{sft.model.version}"
    args = ["pairs", "-m", model, "-d", str(data), "-o", str(out), "--set", f"home={cfg.home}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    [run] = client.search_runs(
        [client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
        "tags.`fulltune.task` = 'pairs'",
    )
    metrics = run.data.metrics
    assert metrics["pairs/prompts"] == 40 and metrics["pairs/pairs"] == len(rows)
    # One pair per prompt the model got wrong, none for those it got right.
    assert len(rows) == round(40 * (1 - metrics["pairs/model_accuracy"]))
    assert 0 < len(rows) < 40
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and rejected in {"red", "green", "blue"}
        assert row["prompt"][-1]["role"] == "user"
    assert run.data.tags["lineage.source_model"] == model
    # The pairs file is a valid DPO training table.
    check_result = check(dpo_overrides(model, out, Path(cfg.home)))
    assert check_result.exit_code == 0, check_result.output


def test_pairs_that_over_choose_one_answer_are_named():
    from tasks.kinds.dpo import Pairs

    def rows(chosen: list[str]) -> list[dict]:
        return [
            {"prompt": [], "chosen": [{"role": "assistant", "content": c}], "rejected": []}
            for c in chosen
        ]

    references = ["red"] * 4 + ["blue"] * 4 + ["green"] * 4
    skewed = Pairs(rows(["red"] * 5 + ["blue"]), 12, 6, ["red", "green", "blue"])
    assert "83% of the pairs choose 'red' (33% of the prompts)" in (skewed.skew(references) or "")
    balanced = Pairs(rows(["red", "blue", "green"] * 2), 12, 6, ["red", "green", "blue"])
    assert balanced.skew(references) is None
    assert Pairs(rows(["red"] * 6), 12, 6, []).skew(references) is None  # an open set


def test_pairs_from_the_rows_an_sft_run_held_out(sft_then_dpo, tiny_llama_dir, tmp_path):
    """--split test: the SFT run's held-out rows (its split, after its contract), every one a
    pair with --share-right 1, none of them a prompt it trained on."""
    cfg, sft, _, _ = sft_then_dpo
    home = Path(cfg.home)
    sft_data = home.parent / "colours.csv"
    out = tmp_path / "held-out.jsonl"
    args = ["pairs", "-m", f"models:/tiny-chat/{sft.model.version}", "-o", str(out)]
    args += ["--split", "test", "--share-right", "1"]
    for item in tiny_overrides(tiny_llama_dir, sft_data, home, task="sft"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    held_out = client.get_run(sft.mlflow_run_id).data.metrics["data/split_test"]
    assert len(rows) == held_out  # every held-out prompt, the set being closed
    questions = dict(zip(*pd.read_csv(sft_data)[["prompt", "completion"]].T.values, strict=True))
    for row in rows:  # each the SFT data's own question, its answer chosen
        assert questions[row["prompt"][-1]["content"]] == row["chosen"][0]["content"]
