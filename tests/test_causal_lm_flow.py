"""A causal-LM run end to end on the tiny GPT-2: the flow, the gate, the sweep, resume."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tasks import tracking
from tasks.config import DataConfig, ModelConfig, load_config
from tasks.kinds import get_kind

from .conftest import corpus, prepare, tiny_overrides

pytestmark = pytest.mark.flow


def lm_overrides(tiny_gpt2_dir: Path, tmp_path: Path) -> list[str]:
    """A causal-LM run on the tiny GPT-2 and the generated sentences, in seconds."""
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(corpus(160)) + "\n")
    return tiny_overrides(tiny_gpt2_dir, data, tmp_path / "home", task="causal-lm")


def test_lm_sweep_minimises_validation_loss(
    tiny_gpt2_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    from flows.sweep import sweep

    cfg = load_config(None, [*lm_overrides(tiny_gpt2_dir, tmp_path), "train.max_steps=12"])
    summary = sweep(config=cfg, trials=2)
    assert summary.metric == "loss"
    completed = [t for t in summary.trials if not t.pruned]
    assert summary.best_value == min(t.value for t in completed)
    assert summary.final.metrics["perplexity"] < summary.final.baseline["perplexity"]


def test_causal_lm_run_lowers_perplexity_and_registers_a_generator(
    tiny_gpt2_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    from flows.finetune import finetune

    general = tmp_path / "general.txt"  # text it did not train on: the same kind of sentences
    general.write_text("\n\n".join(corpus(40, seed=7)))
    cfg = load_config(
        None,
        [
            *lm_overrides(tiny_gpt2_dir, tmp_path),
            "train.max_steps=60",
            "train.threads=1",  # bit for bit on a second run, however busy the machine gets
            f"eval.general_text={general}",
            "eval.general_blocks=8",
        ],
    )
    summary = finetune(config=cfg)

    # The fine-tuned model predicts held-out tokens far better than where it started.
    assert summary.metrics["perplexity"] < 0.5 * summary.baseline["perplexity"]
    assert "untrained model" in summary.table and "perplexity" in summary.table
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    metrics = run.data.metrics
    assert metrics["train/tensors_updated_fraction"] == 1.0  # every weight was trained
    assert metrics["train/tokens_seen"] > 0
    assert metrics["data/tokens_train"] > metrics["data/examples_train"]
    assert metrics["test/perplexity"] == tracking.shown(summary.metrics["perplexity"])  # as read
    assert run.data.tags["fulltune.task"] == "causal-lm"
    # Continued pre-training gets the general-text check too: here it learned, not forgot.
    assert metrics["forgetting/general_perplexity_rise"] < 0 and summary.decision.promoted
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "evaluation")}
    assert "evaluation/generations.json" in artifacts

    version = client.get_model_version("tiny-lm", summary.model.version)
    assert float(version.tags["test.perplexity"]) == pytest.approx(
        summary.metrics["perplexity"], rel=1e-3
    )
    mlflow.set_tracking_uri(cfg.tracking_uri())
    mlflow.set_registry_uri(cfg.tracking_uri())
    generator = mlflow.pyfunc.load_model(f"models:/tiny-lm/{summary.model.version}")
    generated = generator.predict(["the cat"])
    assert isinstance(generated[0], str) and len(generated[0]) > len("the cat")
    from typer.testing import CliRunner

    from flows.cli import app

    uri = cfg.tracking_uri()
    result = CliRunner().invoke(
        app, ["predict", "-m", "models:/tiny-lm/1", "-t", "the cat", "--tracking-uri", uri]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("the cat")
    assert summary.decision is not None and summary.decision.metric == "perplexity"

    # The same config again: the champion is compared on the same blocks, its losses read back.
    again = finetune(config=cfg)
    assert again.decision is not None and again.decision.champion_before == "1"
    assert again.decision.delta == pytest.approx(0.0, abs=1e-6)  # same seed, same model
    assert not again.decision.promoted and "does not beat the margin" in again.decision.reason


def test_lm_training_resumes_from_its_checkpoint(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Resume is the shared recipe's: an LM run picks up from its latest complete checkpoint."""
    from tasks.checkpoints import latest_checkpoint
    from tasks.config import TrainConfig
    from tasks.results import TrainJob
    from tasks.train import train

    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(corpus(160)) + "\n")
    cfg = DataConfig(train=str(data), validation_fraction=0.125, test_fraction=0.125)
    model_cfg = ModelConfig(name_or_path=str(tiny_gpt2_dir), max_length=32)
    _, _, tokenized = prepare(cfg, model_cfg, tmp_path, "causal-lm")
    checkpoints = tmp_path / "checkpoints"

    def run(max_steps: int, folder: str):
        train_cfg = TrainConfig(
            max_steps=max_steps,
            batch_size=8,
            learning_rate=0.01,
            checkpoint_steps=5,
            select_best=False,
            early_stopping_patience=None,
        )
        job = TrainJob(
            tokenized=tokenized,
            labels=[],
            model_cfg=model_cfg,
            cfg=train_cfg,
            eval_batch_size=64,
            task="causal-lm",
            workdir=str(tmp_path / folder),
            checkpoint_dir=str(checkpoints),
        )
        return train(job, get_kind("causal-lm"))

    first = run(10, "first")
    assert first.resumed_from_step is None
    assert latest_checkpoint(checkpoints) is not None
    assert latest_checkpoint(checkpoints).name == "checkpoint-10"
    resumed = run(15, "second")
    assert resumed.resumed_from_step == 10
    assert resumed.global_step == 15  # 5 more steps, not 15 from scratch
