"""The gate's judgments of a language model, end to end on the tiny Llama: free-form answers judged
on their answer loss, a run that did not learn kept as challenger, general capability measured
(general text and a local lm-eval task, offline) and a version that forgot too much refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.config import load_config

from .conftest import COLOURS, colour_rows, tiny_overrides

pytestmark = pytest.mark.flow


def lm_eval_task(folder: Path) -> Path:
    """A multiple-choice lm-eval task read from a local JSONL file (no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / "colours.jsonl"
    names = ["red", "green", "blue"]
    docs.write_text(
        "\n".join(
            json.dumps({"question": f"colour of the {t}?", "answer": names.index(c)})
            for t, c in sorted(COLOURS.items())
        )
    )
    (folder / "colours.yaml").write_text(
        "task: tiny_colours\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        f"doc_to_choice: {json.dumps(names)}\n"
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def free_form(tiny_llama_dir: Path, tmp_path_factory, prefect_harness):
    from flows.finetune import finetune

    work = tmp_path_factory.mktemp("free-form")
    data = work / "described.csv"
    colour_rows(160, free_form=True).to_csv(data, index=False)
    general = work / "general.txt"
    general.write_text("\n\n".join(f"the {t} is {c} today." for t, c in COLOURS.items()) * 8)
    overrides = [
        *tiny_overrides(tiny_llama_dir, data, work / "home", task="sft"),
        "train.max_steps=80",
        f"eval.general_text={general}",
        "eval.general_blocks=8",
        "eval.lm_eval.tasks=[tiny_colours]",
        f"eval.lm_eval.include_path={lm_eval_task(work / 'lm-eval')}",
        "promote.max_forgetting=null",  # measured and reported, not gated
    ]
    cfg = load_config(None, overrides)
    return cfg, finetune(config=cfg), overrides


def test_free_form_answers_are_promoted_on_their_answer_loss(free_form):
    _, summary, _ = free_form
    decision = summary.decision
    assert decision is not None and decision.promoted
    assert decision.metric == "answer_loss" and "free-form" in decision.metric_reason
    assert "zero-shot model" in decision.reason and decision.ci_low is not None
    assert decision.ci_low > 0  # the fall in answer loss, with a CI that excludes 0
    assert summary.metrics["answer_loss"] < 0.5 * summary.baseline["answer_loss"]
    assert 0 <= summary.metrics["rouge_l"] <= 1 and "accuracy" not in summary.metrics
    assert summary.metrics["rouge_l"] > summary.baseline["rouge_l"]


def test_general_capability_is_measured_logged_and_on_the_card(free_form):
    cfg, summary, _ = free_form
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    metrics = run.data.metrics
    for key in ("lm_eval/tiny_colours/acc", "lm_eval_base/tiny_colours/acc"):
        assert 0 <= metrics[key] <= 1
    assert "lm_eval/tiny_colours/acc_stderr" in metrics
    assert "forgetting/general_perplexity_rise" in metrics
    assert "forgetting/lm_eval/tiny_colours/acc_drop_ci_high" in metrics
    assert run.data.tags["lm_eval.chat_template"] == "false"
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "evaluation")}
    assert {"evaluation/lm_eval.json", "evaluation/general_losses.json"} <= artifacts
    assert "evaluation/answers_table.json" in artifacts  # mlflow.log_table: a table in the UI
    card = client.get_model_version("tiny-chat", summary.model.version).description
    assert "## General capability" in card and "tiny_colours" in card
    assert "Decided on `answer_loss`" in card
    tags = client.get_model_version("tiny-chat", summary.model.version).tags
    assert tags["promotion.metric"] == "answer_loss" and "forgetting" not in tags


def test_a_run_that_did_not_learn_is_kept_as_challenger(free_form, tmp_path: Path):
    from flows.finetune import finetune

    _, _, overrides = free_form
    home = tmp_path / "home"
    cfg = load_config(
        None,
        [
            *[o for o in overrides if not o.startswith(("home=", "eval.lm_eval"))],
            f"home={home}",
            "train.max_steps=1",
            "train.learning_rate=1e-7",
        ],
    )
    summary = finetune(config=cfg)
    assert summary.decision is not None and not summary.decision.promoted
    assert summary.decision.metric == "answer_loss"
    assert "does not beat it with a CI above 0" in summary.decision.reason or (
        "margin" in summary.decision.reason
    )
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    aliases = client.get_registered_model("tiny-chat").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"challenger": "1"}  # no champion


def test_a_version_that_forgot_too_much_takes_no_alias_and_fails(
    tiny_llama_dir: Path, tmp_path: Path, prefect_harness
):
    from flows.cli_base import named_cause
    from flows.finetune import finetune
    from tasks.promote import ModelForgot

    data = tmp_path / "colours.csv"
    colour_rows(160).to_csv(data, index=False)
    rng = random.Random(0)
    # Text unlike anything it is tuned on: the tuned model, sure of its colours, finds it harder.
    general = tmp_path / "general.txt"
    general.write_text(
        "\n\n".join(
            " ".join("".join(rng.choices("xqzjkvw#%", k=4)) for _ in range(12)) for _ in range(40)
        )
    )
    cfg = load_config(
        None,
        [
            *tiny_overrides(tiny_llama_dir, data, tmp_path / "home", task="sft"),
            "train.max_steps=60",
            f"eval.general_text={general}",
            "eval.general_blocks=16",
            "promote.max_forgetting=0.0",
        ],
    )
    with pytest.raises(ModelForgot) as caught:
        finetune(config=cfg)
    message = str(caught.value)
    assert "general-text perplexity rose" in message and "promote.max_forgetting" in message
    assert "train.learning_rate" in message and named_cause(caught.value)
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    version = client.get_model_version("tiny-chat", "1")
    assert version.aliases == [] and "general-text perplexity rose" in version.tags["forgetting"]
    assert version.tags["promotion.decision"] == "kept"
    assert client.get_run(version.run_id).info.status == "FAILED"
