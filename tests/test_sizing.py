"""Settings left at `auto` follow the data and the model; a time budget becomes a step count."""

from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk
from mlflow import MlflowClient
from transformers import AutoTokenizer

from tasks import sizing
from tasks.config import load_config

from .conftest import make_rows, tiny_overrides


def test_auto_max_length_covers_95_percent_within_the_model_limit():
    lengths = np.arange(1, 101)  # 1..100 tokens
    value, reason = sizing.size_max_length(lengths, 512, "text-classification")
    assert value == 96 and "95% of 100 training texts fit in 96 tokens" in reason
    capped, why = sizing.size_max_length(lengths * 10, 512, "text-classification")
    assert capped == 512 and "capped at the model's limit of 512" in why
    block, _ = sizing.size_max_length(lengths, 1024, "causal-lm")
    assert block == sizing.LM_BLOCK


def test_head_and_tail_are_chosen_when_many_texts_are_cut():
    short, long = np.full(90, 10), np.full(10, 500)
    assert sizing.choose_truncation("auto", np.concatenate([short, long]), 128)[0] == "head"
    side, reason = sizing.choose_truncation("auto", np.concatenate([short[:80], long, long]), 128)
    assert side == "head+tail" and "20.0% of training texts exceed 128 tokens" in reason
    assert sizing.choose_truncation("head", np.full(10, 500), 128)[0] == "head"


def test_head_tail_keeps_the_opening_and_the_ending_with_special_tokens():
    ids = [101, *range(1, 1000), 102]  # [CLS] ... [SEP]
    kept = sizing.head_tail(ids, 16)
    assert len(kept) == 16 and kept[0] == 101 and kept[-1] == 102
    assert kept[:4] == [101, 1, 2, 3] and kept[4:] == ids[-12:]
    assert sizing.head_tail(ids[:10], 16) == ids[:10]


@pytest.mark.parametrize(
    ("steps", "params", "share"), [(300, 22e6, 0.10), (5000, 22e6, 0.06), (300, 7e9, 0.03)]
)
def test_auto_warmup_follows_run_length_and_model_size(steps: int, params: float, share: float):
    assert sizing.auto_warmup("auto", steps, int(params))[0] == share
    assert sizing.auto_warmup(0.2, steps, int(params))[0] == 0.2


def test_a_time_budget_buys_steps_net_of_validation():
    # 100 steps per epoch, 0.4 s a step's passes (0.5 s with the update), a 10 s validation per
    # epoch: 0.6 s per step in all.
    assert sizing.STEP_OVERHEAD == 1.25
    steps, reason = sizing.plan_budget(600, 0.4, 10, 100)
    assert steps == 1000 and "1000 steps" in reason
    # Tiny data: the budget would buy hundreds of epochs; it stops at the cap.
    capped, why = sizing.plan_budget(3600, 0.1, 0.1, 2)
    assert capped == sizing.MAX_BUDGET_EPOCHS * 2 and "capped" in why


def test_a_revised_budget_fills_what_is_left_within_the_cap():
    # 60 s left, 0.5 s a step and a 10 s validation every 100 steps: 0.6 s a step in all.
    assert sizing.revise_budget(60, 0.5, 10, 100, done=20, cap=1000) == 120
    assert sizing.revise_budget(600, 0.5, 10, 100, done=20, cap=500) == 500
    assert sizing.revise_budget(-5, 0.5, 10, 100, done=20, cap=500) == 21  # over: one more step


def test_a_stretched_schedule_ends_at_the_revised_step():
    """The linear schedule the Trainer built for the loop's cap ends at the plan's last step
    instead, and keeps the rates of the steps already taken."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from tasks.callbacks import stretch_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=90)
    rates = []
    for step in range(30):
        if step == 10:
            stretch_schedule(schedule, 30)
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    assert rates[8] == pytest.approx((90 - 9) / 88)  # before the revision: the old schedule's
    assert rates[-1] == 0.0  # step 30 is the end
    assert rates[20] == pytest.approx((30 - 21) / 28)


@pytest.mark.flow
def test_a_run_on_built_in_defaults_sizes_itself_and_keeps_head_and_tail(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    from flows.finetune import finetune

    rows = make_rows(72)
    # A third of the texts are long: the words that carry the label sit at their very end.
    filler = " ".join(["the day"] * 80)  # past the tiny model's 128 positions
    rows.loc[::3, "review"] = filler + " " + rows.loc[::3, "review"]
    data = tmp_path / "rows.csv"
    rows.to_csv(data, index=False)
    overrides = [
        o
        for o in tiny_overrides(tiny_model_dir, data, tmp_path / "home")
        if not o.startswith(("model.max_length", "train.warmup_fraction", "train.max_steps"))
    ]
    cfg = load_config(None, [*overrides, "train.time_budget=20s", "model.max_length=auto"])
    summary = finetune(config=cfg)

    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    tags, metrics = run.data.tags, run.data.metrics
    lengths = np.load(next((tmp_path / "home" / "cache" / "validate").glob("*/token_lengths.npz")))
    expected = 128  # the 95% length is past the model's limit
    assert np.quantile(lengths["train"], 0.95) > expected
    assert tags["sizing.model.max_length"].startswith(f"{expected} (95% of")
    assert "capped at the model's limit of 128" in tags["sizing.model.max_length"]
    assert tags["sizing.model.truncation"].startswith("head+tail")
    assert tags["sizing.train.warmup_fraction"].startswith("0.1 (")
    # The plan and what happened are both on the run.
    assert metrics["plan/budget_s"] == 20 and metrics["plan/steps"] >= 1
    # The plan may be revised once steps are measured; training never runs past the last plan.
    assert metrics["plan/actual_steps"] <= metrics["plan/revised_steps"]
    assert metrics["plan/reserve_s"] > 0 and metrics["plan/spent_before_training_s"] > 0
    assert metrics["plan/run_s"] > metrics["plan/actual_s"] + metrics["plan/after_training_s"]
    assert "plan.time_budget" in tags
    # Long texts were cut to the sized length, keeping the words at their end.
    [folder] = (tmp_path / "home" / "cache" / "tokenize").glob("*/tokenized")
    train = load_from_disk(str(folder))["train"]
    assert max(train["length"]) == expected
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cut = next(row for row in train if row["length"] == expected)
    assert tokenizer.decode(cut["input_ids"][-4:-1]) != "the day the"  # the tail survived
    assert metrics["data/truncated_fraction_train"] == pytest.approx(
        float((lengths["train"] > expected).mean())
    )


@pytest.mark.flow
def test_a_collapsed_model_is_kept_for_inspection_but_never_aliased(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    from flows.finetune import finetune
    from tasks.promote import ModelCollapsed

    data = tmp_path / "rows.csv"
    make_rows(72).to_csv(data, index=False)
    # Weights that make every class but the first worthless teach the model one answer.
    overrides = [
        *tiny_overrides(tiny_model_dir, data, tmp_path / "home"),
        "train.class_weights=[1.0, 0.0001, 0.0001]",
        "train.max_steps=24",
        "train.select_best=false",
        "promote.on_collapse=fail",  # the default (the tiny runs elsewhere only warn)
    ]
    cfg = load_config(None, overrides)
    with pytest.raises(ModelCollapsed) as caught:
        finetune(config=cfg)
    message = str(caught.value)
    assert "registered as version 1 without an alias and tagged `collapsed`" in message
    assert "train.epochs" in message and "train.class_weights" in message
    assert "train.learning_rate=1.0e-03" in message  # a third of the 3e-3 it used

    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    version = client.get_model_version("tiny-sentiment", "1")
    assert version.aliases == [] and version.tags["collapsed"] == "true"
    assert client.get_registered_model("tiny-sentiment").aliases == {}
    assert client.get_run(version.run_id).info.status == "FAILED"


def test_a_test_file_unlike_training_is_flagged_with_numbers():
    rng = np.random.default_rng(0)
    phrases = [" ".join(rng.choice(["good", "bad", "fine", "film"], 3)) for _ in range(200)]
    same = [" ".join(rng.choice(["good", "bad", "fine", "film"], 3)) for _ in range(50)]
    figures, warning = sizing.distribution_shift(np.full(200, 5), np.full(50, 5), phrases, same)
    assert warning is None and figures["shift/length_ks"] == 0.0
    sentences = [
        "an unexpectedly moving portrait of grief and resilience across three generations"
    ] * 50
    figures, warning = sizing.distribution_shift(
        np.full(200, 5), np.full(50, 14), phrases, sentences
    )
    assert warning is not None and "validation may" not in warning.lower()
    assert figures["shift/length_ks"] == 1.0 and figures["shift/vocab_coverage_test"] < 0.1
    assert "KS 1.00 (median 5 vs 14 tokens)" in warning and "data.validation" in warning
