"""Task types. Each module here holds everything that differs between them; the stages ask the kind.

A kind owns its model class, encoding, collator, validation metrics and checks, its test
evaluation and the evidence its promotion gate weighs. The flow resolves the kind once from
``config.task`` and hands it to the stages; no stage branches on the task name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from datasets import Dataset
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature
    from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from tasks.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
    from tasks.results import (
        Checked,
        EvalResult,
        Evidence,
        InputExample,
        Prepared,
        Splits,
        TrainExtras,
    )


class Kind(Protocol):
    """One task type: the parts of the pipeline that depend on it."""

    task: str
    pipeline_task: str  # the transformers pipeline the registered model runs
    mlflow_task: str  # the MLflow transformers-flavor task (a pipeline task, or llm/v1/chat)
    headline: str  # the test metric named in version tags and summaries
    headline_higher: bool  # whether a higher headline is better
    # The test metrics the gate may decide on (promote.metric); the first is the default unless
    # the evaluation names one from the data (sft: a closed answer set or not).
    gate_metrics: tuple[str, ...]
    selection_metric: str  # Trainer's metric_for_best_model (without the eval_ prefix)
    greater_is_better: bool
    has_labels: bool  # whether rows carry a class label

    def signature(self) -> ModelSignature | None:
        """The MLflow signature of the registered model (None: MLflow's own for the task)."""
        ...

    def input_example(self, splits: Splits) -> InputExample:
        """An input example for the registered model, from the test split."""
        ...

    def columns(self, found: list[str], cfg: DataConfig) -> dict[str, str]:
        """The columns a table must have, given the ones it has: {setting: column name}."""
        ...

    def derive(
        self, frame: pd.DataFrame, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
    ) -> pd.DataFrame:
        """Columns (``_``-prefixed) the kind derives from raw rows for its data contract."""
        ...

    def normalise(self, frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
        """The clean table of a validated raw table: ``text`` and what the kind keeps."""
        ...

    def encode(
        self,
        dataset: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        cfg: ModelConfig,
    ) -> Dataset:
        """Rows -> ``input_ids``, ``attention_mask``, ``labels``, ``length``.

        How many texts ``max_length`` cuts is measured once, by the data contract on the raw
        tables (``data/truncated_fraction_*``).
        """
        ...

    def setup_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        """The pretrained model with this task's head, every weight trainable."""
        ...

    # Any: transformers' collators share no base class that the Trainer's signature names.
    def collator(self, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, training: bool) -> Any:
        """The batch collator: dynamic padding, or packing for training when the kind packs."""
        ...

    def compute_metrics(
        self, labels: list[str]
    ) -> Callable[[EvalPrediction], dict[str, float]] | None:
        """The Trainer's validation metrics, or None when the loss is the metric."""
        ...

    def train_extras(self, cfg: TrainConfig, train: Dataset, labels: list[str]) -> TrainExtras:
        """Task-specific loss or sampler for the shared recipe."""
        ...

    def check(
        self, trainer: Trainer, validation: Dataset, labels: list[str], train: Dataset
    ) -> Checked:
        """The selected model's validation scores and guards."""
        ...

    def evaluate(self, model_dir: str, prepared: Prepared, workdir: Path) -> EvalResult:
        """Score the model and the task's two yardsticks on the test split."""
        ...

    def evaluation_tokens(self, prepared: Prepared) -> float:
        """What :meth:`evaluate` will score, in tokens of forward passes (the fine-tuned model,
        its yardsticks, the champion or parent, generations): a time budget keeps the time
        those take at the probed validation speed."""
        ...

    def evidence(self, evaluation: EvalResult, metric: str) -> Evidence:
        """The challenger's per-example test scores and the yardsticks, for the gate."""
        ...

    def champion_columns(
        self, champion: ModelVersion, evaluation: EvalResult, prepared: Prepared, metric: str
    ) -> tuple[tuple[np.ndarray, ...] | None, str | None, bool]:
        """The champion's per-example columns on this test split: (columns, why not, rescored)."""
        ...

    def inference_config(self, cfg: EvalConfig, evaluation: EvalResult) -> dict[str, int | bool]:
        """Settings stored with the registered model (generation length, ...), as evaluated."""
        ...


def get_kind(task: str) -> Kind:
    """The kind of a config's ``task``."""
    from tasks.kinds.causal_lm import CausalLM
    from tasks.kinds.classification import Classification
    from tasks.kinds.dpo import DPO
    from tasks.kinds.sft import SFT

    kinds: dict[str, Kind] = {k.task: k for k in (Classification(), CausalLM(), SFT(), DPO())}
    if task not in kinds:
        raise ValueError(f"unknown task {task!r} (known: {sorted(kinds)})")
    return kinds[task]
