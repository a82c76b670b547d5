"""What the stages hand each other: small typed results (paths, ids, metrics), never models.

Every stage imports its result types from here and no stage owns them, so a stage that only needs
another stage's output never has to import that stage's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.config import ModelConfig, RunConfig, TrainConfig

# What a registered model is shown as its input example: texts, or a chat request.
InputExample = list[str] | dict[str, list[dict[str, str]]]


class ValidatedData(BaseModel):
    """What passed validation: normalised tables on disk (``text``, and ``label`` when the task
    has labels; ``labels`` is then the frozen label set, else empty)."""

    train_path: str
    validation_path: str | None
    test_path: str | None
    labels: list[str]
    fingerprint: str
    rows: dict[str, int]
    report_path: str
    html_report_path: str
    quarantine_path: str | None
    dropped: dict[str, int]
    encoding_fallback_lines: int
    truncated_fraction: dict[str, float]
    token_lengths_path: str | None = None  # .npz: tokens per row of each table, as validated
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The validation outcome as run metrics (``data/...``)."""
        return (
            {f"data/rows_{k}": v for k, v in self.rows.items()}
            | {f"data/dropped/{rule}": n for rule, n in self.dropped.items()}
            | {f"data/truncated_fraction_{k}": v for k, v in self.truncated_fraction.items()}
            | {
                "data/encoding_fallback_lines": self.encoding_fallback_lines,
                "data/validation_s": self.seconds,
            }
        )


class Splits(BaseModel):
    """Paths of the three splits (Parquet: ``text``, and ``label`` when labelled) and sizes."""

    train_path: str
    validation_path: str
    test_path: str
    rows: dict[str, int]
    label_counts: dict[str, dict[str, int]]


class TokenizedData(BaseModel):
    """A ``DatasetDict`` on disk: ``input_ids``, ``attention_mask``, ``labels``, ``length``."""

    path: str
    rows: dict[str, int]
    tokens: dict[str, int]  # non-pad tokens per split
    mean_tokens: dict[str, float]

    def metrics(self) -> dict[str, float]:
        """Token counts per split as run metrics (``data/...``)."""
        return (
            {f"data/mean_tokens_{k}": v for k, v in self.mean_tokens.items()}
            | {f"data/tokens_{k}": float(v) for k, v in self.tokens.items()}
            | {f"data/examples_{k}": float(v) for k, v in self.rows.items()}
        )


class TrainExtras(BaseModel):
    """Task-specific additions to the shared training recipe."""

    # Any: a Trainer ``compute_loss_func`` closure and a numpy array are not pydantic types.
    model_config = ConfigDict(arbitrary_types_allowed=True)

    compute_loss_func: Callable[..., Any] | None = None
    # A batch's loss when it is not one forward pass's (dpo: the policy on the chosen and the
    # rejected answers against the reference): (model, inputs) -> loss. Rows keep every column.
    batch_loss: Callable[[Any, dict[str, Any]], Any] | None = None
    # Columns computed once with the starting model before training (dpo: the reference's
    # log-probabilities): (model, {"train": ..., "validation": ...}) -> the same, extended.
    reference: Callable[[Any, Any], Any] | None = None
    sampler_labels: np.ndarray | None = None  # per-row class ids: draw batches class-balanced
    notes: dict[str, str] = {}  # tags for the run, e.g. the class weights used


class Checked(BaseModel):
    """The selected model's validation scores and what the task's guards found."""

    validation: dict[str, float]
    reference: dict[str, float] = {}  # a yardstick on the same rows (e.g. the majority class)
    collapse: str | None = None  # why the model may never be promoted


class TrainResult(BaseModel):
    """Where the fine-tuned model was saved, and what training did."""

    model_dir: str
    global_step: int
    train_samples: int
    epochs: float
    learning_rate: float
    best_step: int | None
    stopped_early: bool
    notes: dict[str, str]
    train_loss: float
    first_logged_loss: float | None
    last_logged_loss: float | None
    runtime_s: float
    samples_per_s: float
    params_total: int
    params_updated: int
    tensors_total: int
    tensors_updated: int
    validation: dict[str, float]
    validation_curve: list[dict[str, float]]
    reference: dict[str, float]
    collapse: str | None
    batch_size: int
    gradient_accumulation_steps: int
    step_time_s: float
    non_pad_tokens: int
    tokens_per_s: float
    mfu: float
    matmul_peak_flops: float
    peak_rss_bytes: int
    preflight_estimate_bytes: int
    resumed_from_step: int | None = None
    weights_digest: str = ""  # sha256 of the trained weights: equal across data-parallel ranks
    num_processes: int = 1
    plan: dict[str, float] = {}  # a time budget's plan against what happened (``plan/...``)
    validation_s: float = 0.0  # forward passes over the validation split during training
    # This process's parameters, gradients and optimizer state, measured (a shard's under FSDP).
    state_bytes: dict[str, int] = {}

    def metrics(self) -> dict[str, float]:
        """What training did, as run metrics (``train/``, ``efficiency/``, ``val_selected/``,
        ``plan/``)."""
        return (
            {
                "train/runtime_s": self.runtime_s,
                "train/samples_per_s": self.samples_per_s,
                "train/mean_loss": self.train_loss,
                "train/epochs": self.epochs,
                "train/peak_learning_rate": self.learning_rate,
                "train/best_step": float(self.best_step or self.global_step),
                "train/stopped_early": float(self.stopped_early),
                "train/params_total": self.params_total,
                "train/params_updated_fraction": self.params_updated / self.params_total,
                "train/tensors_updated_fraction": self.tensors_updated / self.tensors_total,
                "train/tokens_seen": self.non_pad_tokens,
                "train/num_processes": self.num_processes,
                "efficiency/step_time_s": self.step_time_s,
                "efficiency/validation_s": self.validation_s,
                "efficiency/tokens_per_s": self.tokens_per_s,
                "efficiency/samples_per_s": self.samples_per_s,
                "efficiency/mfu": self.mfu,
                "efficiency/matmul_peak_flops": self.matmul_peak_flops,
                "efficiency/peak_rss_bytes": self.peak_rss_bytes,
                "efficiency/preflight_estimate_bytes": self.preflight_estimate_bytes,
                "efficiency/non_pad_tokens": self.non_pad_tokens,
            }
            | {f"efficiency/rank_{k}_bytes": float(v) for k, v in self.state_bytes.items()}
            | {f"val_selected/{k}": v for k, v in self.validation.items()}
            | {f"val_selected/{k}": v for k, v in self.reference.items()}
            | {k: v for k, v in self.plan.items() if k.startswith("plan/")}
        )


class Prepared(BaseModel):
    """What every flow trains and is judged on: the data validated, split and tokenized, and the
    run's settings resolved against it. ``cfg`` is the config with the model materialised (a
    folder of weights and tokenizer), ``model.max_length`` and ``model.truncation`` sized to the
    data and the contract's settings filled in: the settings every later stage reads."""

    model_config = ConfigDict(frozen=True)

    cfg: RunConfig
    data: ValidatedData
    splits: Splits
    tokenized: TokenizedData

    def scored_test_rows(self) -> int:
        """The test rows the evaluation scores (at most ``eval.max_test_samples``)."""
        rows, cap = self.tokenized.rows.get("test", 0), self.cfg.eval.max_test_samples
        return min(rows, cap) if cap else rows

    def scored_test_tokens(self) -> float:
        """Tokens of the test rows the evaluation scores."""
        return self.scored_test_rows() * self.tokenized.mean_tokens.get("test", 0.0)

    def general_text_tokens(self) -> float:
        """Tokens of ``eval.general_text`` scored before and after (by the base and the model)."""
        cfg = self.cfg
        return 2.0 * cfg.eval.general_blocks * cfg.model.tokens() if cfg.eval.general_text else 0.0


class TrainJob(BaseModel):
    """Everything one training process needs (the train stage's input, also as JSON for ranks)."""

    tokenized: TokenizedData
    labels: list[str]
    model_cfg: ModelConfig
    cfg: TrainConfig
    eval_batch_size: int
    task: str
    workdir: str
    checkpoint_dir: str | None = None  # resumable checkpoints go here (``train.checkpoint_steps``)
    run_id: str | None = None  # MLflow run that rank 0 streams the training metrics to
    after_step: int = -1
    # When the run's clock started (epoch seconds): a time budget ends that long after it, less
    # the time the test evaluation's tokens take (Kind.evaluation_tokens).
    clock_started: float | None = None
    evaluation_tokens: float = 0.0

    def result_path(self, rank: int) -> Path:
        """Where rank ``rank`` writes its :class:`TrainResult`."""
        return Path(self.workdir) / f"train-result-rank{rank}.json"


class EvalResult(BaseModel):
    """Test-split metrics of the model and of the task's two yardsticks, and where details are.

    Each kind extends it with what its evaluation adds (a confusion matrix, generations); the
    flow, the summary and the gate read only these fields.
    """

    metrics: dict[str, float]
    baseline: dict[str, float]  # the first yardstick (majority class, untrained model)
    classical: dict[str, float]  # the second (TF-IDF + LR, unigram model)
    test_rows: int
    test_fingerprint: str
    scores_path: str  # per-example test scores, for the gate's paired comparison
    scoring_s: float = 0.0  # forward passes over the test split: work, not overhead
    precision: str = "fp32"  # the arithmetic the test split was scored in
    # The gate's metric when promote.metric leaves it to the data (sft), and why.
    default_metric: str | None = None
    default_metric_reason: str = ""
    # General text before and after (perplexity_before, perplexity_after, rise, blocks), when
    # measured, and the per-block losses behind it (for the forgetting gate).
    general: dict[str, float] = {}
    general_path: str | None = None

    headline_keys: tuple[str, ...] = ()
    baseline_names: tuple[str, str] = ("baseline", "classical")

    def artifacts(self) -> list[str]:
        return [self.scores_path, *([self.general_path] if self.general_path else [])]

    def version_tags(self) -> dict[str, str]:
        return {"test.fingerprint": self.test_fingerprint, "test.precision": self.precision}

    def tables(self) -> dict[str, list[dict[str, str]]]:
        return {}

    def details_markdown(self) -> str:
        return ""

    def table(self) -> str:
        """The headline test metrics next to the two yardsticks, as Markdown."""
        first, second = self.baseline_names
        rows = [f"| metric | fine-tuned | {first} | {second} |", "|---|---|---|---|"]
        for key in self.headline_keys:
            values = (self.metrics.get(key), self.baseline.get(key), self.classical.get(key))
            rows.append(
                f"| {key} | "
                + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values)
                + " |"
            )
        return "\n".join(rows)


@dataclass(frozen=True)
class Evidence:
    """What the promotion gate compares: per-example columns and how they become one score.

    ``statistic(*columns)`` is the metric on any subset of rows (the bootstrap resamples rows, the
    same rows for challenger and champion). Scores are in the statistic's own unit; ``reported``
    turns one into the metric people read (a mean token loss into a perplexity).
    """

    metric: str
    columns: tuple[np.ndarray, ...]
    statistic: Callable[..., float]
    higher_is_better: bool
    floors: dict[str, float]  # yardstick scores (same statistic) the first champion must beat
    correct: Callable[..., np.ndarray] | None = None  # per-example 0/1, for McNemar's test
    reported: Callable[[float], float] = field(default=lambda score: score)
    # A yardstick scored row by row on the same rows (the zero-shot model): the first champion
    # must beat it with a paired bootstrap CI above 0, not just on the point estimate.
    yardstick: tuple[str, tuple[np.ndarray, ...]] | None = None


class HarnessTask(BaseModel):
    """One lm-evaluation-harness task on the fine-tuned (``after``) and the base model."""

    name: str
    metric: str
    higher_is_better: bool
    after: float
    before: float
    after_stderr: float
    before_stderr: float
    after_docs: list[float]  # per-document scores, the same documents in the same order
    before_docs: list[float]

    @property
    def samples(self) -> int:
        return len(self.after_docs)


class HarnessResult(BaseModel):
    """lm-evaluation-harness tasks on the fine-tuned and the base model."""

    tasks: list[HarnessTask]
    chat_template: bool
    limit: int | None
    seconds: float

    def metrics(self) -> dict[str, float]:
        """``lm_eval/TASK/METRIC`` (fine-tuned), ``lm_eval_base/...``, with ``_stderr``."""
        out: dict[str, float] = {"lm_eval/seconds": self.seconds}
        for t in self.tasks:
            out |= {
                f"lm_eval/{t.name}/{t.metric}": t.after,
                f"lm_eval/{t.name}/{t.metric}_stderr": t.after_stderr,
                f"lm_eval_base/{t.name}/{t.metric}": t.before,
                f"lm_eval_base/{t.name}/{t.metric}_stderr": t.before_stderr,
            }
        return out

    def markdown(self) -> str:
        mode = "with the chat template" if self.chat_template else "without the chat template"
        rows = [
            f"lm-evaluation-harness, {mode}"
            + (f", at most {self.limit} documents per task" if self.limit else "")
            + ":",
            "",
            "| task | metric | base | fine-tuned | documents |",
            "|---|---|---|---|---|",
        ]
        rows += [
            f"| {t.name} | {t.metric} | {t.before:.4f} ± {t.before_stderr:.4f} | "
            f"{t.after:.4f} ± {t.after_stderr:.4f} | {t.samples} |"
            for t in self.tasks
        ]
        return "\n".join(rows)


class Decision(BaseModel):
    """The gate's verdict for one model version."""

    promoted: bool
    reason: str
    version: str
    champion_before: str | None
    metric: str
    challenger_score: float
    champion_score: float | None = None
    delta: float | None = None  # positive: the challenger is better (in the statistic's unit)
    ci_low: float | None = None
    ci_high: float | None = None
    mcnemar_p: float | None = None
    reevaluated_champion: bool = False
    metric_reason: str = ""  # why this metric decided (promote.metric, or what the data says)

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags."""
        tags = {
            "promotion.decision": "promoted" if self.promoted else "kept",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.metric_reason": self.metric_reason or "set by promote.metric",
            "promotion.compared_to": self.champion_before or "none",
        }
        if self.delta is not None:
            tags |= {
                "promotion.delta": f"{self.delta:.4f}",
                "promotion.ci95": f"[{self.ci_low:.4f}, {self.ci_high:.4f}]",
            }
        if self.mcnemar_p is not None:
            tags["promotion.mcnemar_p"] = f"{self.mcnemar_p:.4g}"
        return tags

    def metrics(self) -> dict[str, float]:
        """The decision as run metrics (``promotion/...``)."""
        metrics = {"promotion/promoted": float(self.promoted)}
        if self.delta is not None:
            metrics |= {
                "promotion/delta": self.delta,
                "promotion/ci_low": self.ci_low or 0.0,
                "promotion/ci_high": self.ci_high or 0.0,
            }
        return metrics


class RegisteredModel(BaseModel):
    """A registered model version and how to load it."""

    name: str
    version: str
    alias: str | None  # None: registered for inspection only (a collapsed model)
    model_uri: str
