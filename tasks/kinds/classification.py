"""Text classification: a pretrained encoder plus a new head, one label per text.

Everything that is particular to it lives here: encoding, class-weighted cross-entropy on skewed
data, selection by validation macro F1 with a collapse guard, the test evaluation against the
majority class and TF-IDF + logistic regression, and the per-row evidence for the promotion gate.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tasks.caching import cache_root
from tasks.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from tasks.metrics import classification_metrics, gate_statistic, tfidf_baseline
from tasks.results import (
    Checked,
    EvalResult,
    Evidence,
    InputExample,
    Prepared,
    Splits,
    TrainExtras,
)
from tasks.sizing import head_tail
from tasks.sources import fingerprint, resolve_model
from tasks.threads import THREADS
from tasks.tracking import pyplot

# torch, transformers' models, datasets, sklearn and matplotlib load where they are used: the data
# contract (the first stage) needs none of them, and importing them takes seconds.
if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import (
        DataCollatorWithPadding,
        EvalPrediction,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        Trainer,
    )
    from transformers.modeling_outputs import ModelOutput
    from transformers.trainer_utils import PredictionOutput

log = logging.getLogger(__name__)


# --- training --------------------------------------------------------------------------------


def class_weights(cfg: TrainConfig, label_counts: list[int]) -> list[float] | None:
    """Loss weights per class id. ``auto``: sqrt of inverse frequency, mean weight 1 per row.

    The square root tempers the correction: a 65% majority class still counts, but it no longer
    drowns out the rest. On balanced data every weight is 1, i.e. plain cross-entropy.
    """
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != len(label_counts):
            raise ValueError(
                f"train.class_weights has {len(cfg.class_weights)} weights for "
                f"{len(label_counts)} labels"
            )
        return list(cfg.class_weights)
    counts = np.maximum(np.asarray(label_counts, dtype=float), 1.0)
    raw = np.sqrt(counts.sum() / (len(counts) * counts))
    raw /= (raw * counts).sum() / counts.sum()
    return [round(float(w), 6) for w in raw]


def weighted_loss(weights: list[float]) -> Callable[..., torch.Tensor]:
    """A ``Trainer`` ``compute_loss_func``: class-weighted cross-entropy."""
    import torch
    import torch.nn.functional as F

    weight = torch.tensor(weights)

    def loss(
        outputs: ModelOutput, labels: torch.Tensor, num_items_in_batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = outputs["logits"].float()
        w = weight.to(logits.device)
        if num_items_in_batch is None:
            return F.cross_entropy(logits, labels, weight=w)
        # Summed and divided by the batch's item count, so gradient accumulation stays exact.
        return F.cross_entropy(logits, labels, weight=w, reduction="sum") / num_items_in_batch

    return loss


def collapse_check(
    y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], majority: int
) -> tuple[str | None, float]:
    """Why the model is no better than guessing on validation, or None; and the majority's F1."""
    majority_f1 = classification_metrics(y_true, np.full_like(y_true, majority), labels)["macro_f1"]
    model_f1 = classification_metrics(y_true, y_pred, labels)["macro_f1"]
    predicted = np.unique(y_pred)
    if len(predicted) == 1:
        return (
            f"collapsed: every validation prediction is {labels[int(predicted[0])]!r}",
            majority_f1,
        )
    if model_f1 <= majority_f1:
        return (
            f"no better than the majority baseline on validation "
            f"(macro F1 {model_f1:.4f} <= {majority_f1:.4f})",
            majority_f1,
        )
    return None, majority_f1


def _logits(prediction: EvalPrediction | PredictionOutput) -> np.ndarray:
    logits = prediction.predictions
    return np.asarray(logits[0] if isinstance(logits, tuple) else logits)


# --- evaluation ------------------------------------------------------------------------------


class ClassificationEval(EvalResult):
    """Test metrics of the classifier, the majority class and TF-IDF + LR, and the details."""

    majority_label: str
    confusion_matrix: list[list[int]]
    confusion_matrix_png: str
    per_class_png: str

    headline_keys: tuple[str, ...] = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
    baseline_names: tuple[str, str] = ("majority baseline", "TF-IDF + LR")

    def artifacts(self) -> list[str]:
        return [self.confusion_matrix_png, self.per_class_png, self.scores_path]

    def version_tags(self) -> dict[str, str]:
        return super().version_tags() | {"test.macro_f1": f"{self.metrics['macro_f1']:.4f}"}

    def details_markdown(self) -> str:
        return f"Majority label: `{self.majority_label}`"


PREDICTIONS_FILE = "test_predictions.json"  # per-row predictions, logged under evaluation/


def majority_label(train_label_counts: dict[str, int]) -> str:
    """The most frequent training label (ties go to the first in sorted order)."""
    return max(sorted(train_label_counts), key=lambda label: train_label_counts[label])


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path) -> Path:
    """Write the confusion matrix (rows: true label, columns: predicted) as a PNG."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
    size = max(4.0, 0.9 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=labels).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class(
    scores: dict[str, dict[str, float]], labels: list[str], path: Path, key: str = "f1"
) -> Path:
    """Per-class F1 of the model and its yardsticks, as grouped bars (PNG)."""
    plt = pyplot()
    width = 0.8 / len(scores)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) + 2), 3.6))
    for i, (name, metrics) in enumerate(scores.items()):
        values = [metrics.get(f"{key}/{label}", 0.0) for label in labels]
        ax.bar(x + (i - (len(scores) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"test {key.upper()}")
    ax.set_title(f"Per-class test {key.upper()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def predict_ids(
    model_dir: str, dataset: Dataset, batch_size: int, precision: str = "fp32"
) -> np.ndarray:
    """Predicted class ids for a tokenized dataset, in the dataset's own order.

    Scored in length-sorted batches (padding stays small) under ``torch.inference_mode``, in
    ``precision`` (``bf16``: autocast); each prediction goes back to its row.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.efficiency import scoring_arithmetic

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arithmetic = scoring_arithmetic(model, precision, device)
    model.to(device).eval()
    columns = [
        c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.features
    ]
    features = dataset.select_columns(columns).to_dict()  # once: no per-batch Arrow selects
    order = np.argsort(np.asarray(dataset["length"]), kind="stable")
    predicted = np.empty(len(dataset), dtype=np.int64)
    with torch.inference_mode(), arithmetic:
        for start in range(0, len(order), batch_size):
            THREADS.refit()  # another job may have started or ended
            index = order[start : start + batch_size]
            rows = {name: [values[i] for i in index] for name, values in features.items()}
            batch = tokenizer.pad(rows, return_tensors="pt")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            predicted[index] = logits.argmax(-1).cpu().numpy()
    return predicted


# --- the kind --------------------------------------------------------------------------------


class Classification:
    """The text-classification kind (see :class:`tasks.kinds.Kind`)."""

    task = "text-classification"
    pipeline_task = "text-classification"
    mlflow_task = "text-classification"
    headline, headline_higher = "macro_f1", True
    gate_metrics: tuple[str, ...] = ("macro_f1", "accuracy")
    selection_metric = "macro_f1"
    greater_is_better = True
    has_labels = True

    def signature(self) -> ModelSignature:
        return ModelSignature(
            inputs=Schema([ColSpec("string")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
        )

    def columns(self, found: list[str], cfg: DataConfig) -> dict[str, str]:
        return {"data.text_column": cfg.text_column, "data.label_column": cfg.label_column}

    def derive(
        self, frame: pd.DataFrame, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase | None
    ) -> pd.DataFrame:
        return pd.DataFrame(index=frame.index)  # the contract's generic columns suffice

    def normalise(self, frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "text": frame[cfg.text_column].astype(str).to_numpy(),
                "label": frame[cfg.label_column].to_numpy(),
            }
        )

    def input_example(self, splits: Splits) -> InputExample:
        return pd.read_parquet(splits.test_path)["text"].head(3).tolist()

    def encode(
        self,
        dataset: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        cfg: ModelConfig,
    ) -> Dataset:
        """Token ids (truncated at ``max_length``, unpadded), integer labels and lengths."""
        label2id = {label: i for i, label in enumerate(labels)}

        max_length = cfg.tokens()

        def _encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
            if cfg.truncation == "head+tail":  # keep each long text's opening and its ending
                full = tokenizer(batch["text"], truncation=False)
                encoded = {k: [head_tail(v, max_length) for v in vs] for k, vs in full.items()}
            else:
                encoded = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
            ids = encoded["input_ids"]
            return encoded | {
                "labels": [label2id[label] for label in batch["label"]],
                "length": [len(x) for x in ids],
            }

        return dataset.map(_encode, batched=True, remove_columns=dataset.column_names)

    def setup_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        """The pretrained encoder plus a new head sized to ``labels``, every weight trainable."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(cfg.name_or_path),
            revision=cfg.revision,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            # A checkpoint that already has a head of another size gets a new one.
            ignore_mismatched_sizes=True,
        )
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def collator(
        self, tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, training: bool
    ) -> DataCollatorWithPadding:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, labels: list[str]) -> Callable[[EvalPrediction], dict[str, float]]:
        """Validation accuracy and macro F1 for the Trainer (selection uses macro F1)."""

        def metrics(prediction: EvalPrediction) -> dict[str, float]:
            y_true = np.asarray(prediction.label_ids)
            scores = classification_metrics(y_true, _logits(prediction).argmax(-1), labels)
            return {k: scores[k] for k in ("accuracy", "macro_f1")}

        return metrics

    def train_extras(self, cfg: TrainConfig, train: Dataset, labels: list[str]) -> TrainExtras:
        """Class weights for the loss (or class-balanced sampling), from the training labels."""
        ids = np.asarray(train["labels"])
        weights = class_weights(cfg, np.bincount(ids, minlength=len(labels)).tolist())
        return TrainExtras(
            compute_loss_func=weighted_loss(weights) if weights else None,
            sampler_labels=ids if cfg.balanced_sampling else None,
            notes={"train.class_weights": str(weights) if weights else "none"},
        )

    def check(
        self, trainer: Trainer, validation: Dataset, labels: list[str], train: Dataset
    ) -> Checked:
        """The selected model on validation: the numbers selection used, and the collapse guard."""
        prediction = trainer.predict(validation)
        y_val, p_val = np.asarray(prediction.label_ids), _logits(prediction).argmax(-1)
        counts = np.bincount(np.asarray(train["labels"]), minlength=len(labels))
        collapse, majority_f1 = collapse_check(y_val, p_val, labels, int(np.argmax(counts)))
        return Checked(
            validation=classification_metrics(y_val, p_val, labels),
            reference={"majority_macro_f1": majority_f1},
            collapse=collapse,
        )

    def evaluation_tokens(self, prepared: Prepared) -> float:
        """The model over the test rows (a champion rescored on them adds as much again, when
        there is one)."""
        return prepared.scored_test_tokens()

    def evaluate(self, model_dir: str, prepared: Prepared, workdir: Path) -> ClassificationEval:
        """Accuracy, macro P/R/F1, per-class P/R/F1 and a confusion matrix on the test split.

        The same rows are scored by the majority-class and the TF-IDF baselines, and the per-row
        predictions are saved so that a later model can be compared with this one row by row.
        """
        tokenized, labels, splits = prepared.tokenized, prepared.data.labels, prepared.splits
        cfg, seed = prepared.cfg.eval, prepared.cfg.train.seed
        cache_dir = cache_root(prepared.cfg)
        import torch
        from datasets import load_from_disk
        from sklearn.metrics import confusion_matrix

        from tasks.efficiency import resolve_precision

        test = load_from_disk(tokenized.path)["test"].add_column(
            "row", list(range(tokenized.rows["test"]))
        )
        if cfg.max_test_samples is not None and cfg.max_test_samples < len(test):
            test = test.shuffle(seed=seed).select(range(cfg.max_test_samples)).sort("row")
        rows = np.asarray(test["row"])
        y_true = np.asarray(test["labels"])
        precision, why = resolve_precision(cfg.precision, torch.cuda.is_available())
        log.info("scoring %d test rows in %s (%s)", len(test), precision, why)
        started = time.perf_counter()
        y_pred = predict_ids(model_dir, test, cfg.batch_size, precision)
        scoring_s = time.perf_counter() - started

        train_frame = pd.read_parquet(splits.train_path)
        test_frame = pd.read_parquet(splits.test_path).iloc[rows]
        label_ids = {label: i for i, label in enumerate(labels)}
        classical_pred = tfidf_baseline(
            train_frame["text"].tolist(),
            [label_ids[v] for v in train_frame["label"]],
            test_frame["text"].tolist(),
            seed,
            cache_dir,
        )
        majority = majority_label(train_frame["label"].value_counts().to_dict())
        baseline_pred = np.full_like(y_true, labels.index(majority))
        matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(labels))))
        png = plot_confusion(matrix, labels, workdir / "confusion_matrix.png")
        scores_path = workdir / PREDICTIONS_FILE
        scores_path.write_text(
            json.dumps(
                {
                    "labels": labels,
                    "y_true": y_true.tolist(),
                    "y_pred": y_pred.tolist(),
                }
            )
        )
        metrics = classification_metrics(y_true, y_pred, labels)
        baseline = classification_metrics(y_true, baseline_pred, labels)
        classical = classification_metrics(y_true, classical_pred, labels)
        per_class = plot_per_class(
            {"fine-tuned": metrics, "TF-IDF + LR": classical, "majority": baseline},
            labels,
            workdir / "per_class_f1.png",
        )
        return ClassificationEval(
            metrics=metrics,
            scoring_s=scoring_s,
            precision=precision,
            baseline=baseline,
            classical=classical,
            per_class_png=str(per_class),
            majority_label=majority,
            test_rows=len(y_true),
            test_fingerprint=fingerprint(test_frame.reset_index(drop=True)),
            confusion_matrix=matrix.tolist(),
            confusion_matrix_png=str(png),
            scores_path=str(scores_path),
        )

    def evidence(self, evaluation: EvalResult, metric: str) -> Evidence:
        """Per-row (true label, prediction); the floors are the yardsticks' scores."""
        logged = json.loads(Path(evaluation.scores_path).read_text())
        statistic = gate_statistic(metric, len(logged["labels"]))
        y_true = np.asarray(logged["y_true"])
        return Evidence(
            metric=metric,
            columns=(y_true, np.asarray(logged["y_pred"])),
            statistic=statistic,
            higher_is_better=True,
            floors={
                "majority baseline": evaluation.baseline[metric],
                "TF-IDF + logistic regression": evaluation.classical[metric],
            },
            correct=lambda y, p: y == p,
        )

    def champion_columns(
        self, champion: ModelVersion, evaluation: EvalResult, prepared: Prepared, metric: str
    ) -> tuple[tuple[np.ndarray, ...] | None, str | None, bool]:
        """The champion's predictions on this test split: logged when it saw the same rows."""
        splits, labels = prepared.splits, prepared.data.labels
        batch_size = prepared.cfg.eval.batch_size
        import torch
        from transformers import AutoModelForSequenceClassification

        from tasks.efficiency import scoring_arithmetic

        client = MlflowClient()
        y_true = np.asarray(json.loads(Path(evaluation.scores_path).read_text())["y_true"])
        same_rows = champion.tags.get("test.fingerprint") == evaluation.test_fingerprint
        # Versions from before test.precision was recorded were scored in fp32.
        same_arithmetic = champion.tags.get("test.precision", "fp32") == evaluation.precision
        if same_rows and same_arithmetic:
            path = client.download_artifacts(str(champion.run_id), f"evaluation/{PREDICTIONS_FILE}")
            logged = json.loads(Path(path).read_text())
            if logged["labels"] == labels:
                return (y_true, np.asarray(logged["y_pred"])), None, False
        texts = pd.read_parquet(splits.test_path)["text"].tolist()
        if len(texts) != len(y_true):
            return None, "the gate needs the whole test split (eval.max_test_samples unset)", False
        import tempfile

        from tasks.sources import load_registered

        log.info(
            "champion v%s was scored on other rows or in other arithmetic: scoring it on this "
            "test split in %s",
            champion.version,
            evaluation.precision,
        )
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = load_registered(
                champion.name, champion.version, AutoModelForSequenceClassification, Path(tmp)
            )
        names = model.config.id2label
        limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        model.eval()  # scored where it was loaded: on the CPU
        arithmetic = scoring_arithmetic(model, evaluation.precision, torch.device("cpu"))
        predicted = []
        with torch.inference_mode(), arithmetic:
            for start in range(0, len(texts), batch_size):
                THREADS.refit()  # another job may have started or ended
                batch = tokenizer(
                    texts[start : start + batch_size],
                    truncation=True,
                    max_length=limit,
                    padding=True,
                    return_tensors="pt",
                )
                predicted += [names[i] for i in model(**batch).logits.argmax(-1).tolist()]
        index = {label: i for i, label in enumerate(labels)}
        # A champion with another label set can predict a label this test set doesn't know: wrong.
        return (y_true, np.asarray([index.get(p, -1) for p in predicted])), None, True

    def inference_config(self, cfg: EvalConfig, evaluation: EvalResult) -> dict[str, int | bool]:
        return {}
