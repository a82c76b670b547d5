"""The full-parameter fine-tuning recipe: every weight of the pretrained model is trained.

Setup helpers build the model, the data and the training arguments; then one ``Trainer.train()``
call runs the loop (AdamW, linear warmup and decay, weight decay, gradient clipping, seeded).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, load_from_disk
from pydantic import BaseModel
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from tasks.config import ModelConfig, TrainConfig
from tasks.metrics import classification_metrics
from tasks.sources import load_tokenizer, resolve_model
from tasks.tokenize import TokenizedData

log = logging.getLogger(__name__)


class TrainResult(BaseModel):
    """Where the fine-tuned model was saved, and what training did."""

    model_dir: str
    global_step: int
    train_samples: int
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


def setup_model(cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
    """The pretrained encoder plus a new head sized to ``labels``, every weight trainable."""
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


def setup_data(tokenized: TokenizedData, cfg: TrainConfig) -> DatasetDict:
    """The tokenized splits, with the train/validation subsets the config asks for."""
    data = load_from_disk(tokenized.path)
    assert isinstance(data, DatasetDict)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(data["train"]):
        data["train"] = data["train"].shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(data["validation"]):
        data["validation"] = (
            data["validation"].shuffle(seed=cfg.seed).select(range(cfg.max_eval_samples))
        )
    return data


def setup_args(cfg: TrainConfig, output_dir: Path) -> TrainingArguments:
    """Map our recipe onto ``TrainingArguments``."""
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_fraction,  # a float in [0, 1) is a share of the total steps
        lr_scheduler_type="linear",
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        use_cpu=cfg.device == "cpu",
        disable_tqdm=False,
    )


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter, to prove afterwards that each one was updated."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def count_updated(
    model: torch.nn.Module, before: dict[str, torch.Tensor]
) -> tuple[int, int, int, int]:
    """(params_total, params_updated, tensors_total, tensors_updated) against a snapshot."""
    params_total = params_updated = tensors_updated = 0
    for name, param in model.named_parameters():
        changed = param.detach().cpu() != before[name]
        params_total += param.numel()
        params_updated += int(changed.sum())
        tensors_updated += int(bool(changed.any()))
    return params_total, params_updated, len(before), tensors_updated


def train(
    tokenized: TokenizedData,
    labels: list[str],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    workdir: Path,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Fine-tune every parameter of the model on the train split and save it to ``workdir/model``.

    The validation split is scored after each epoch; the test split is never loaded here.
    """
    set_seed(cfg.seed)  # before the head is initialised, so runs are reproducible
    data = setup_data(tokenized, cfg)
    tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.revision)
    model = setup_model(model_cfg, labels)
    before = snapshot(model)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        y_true = np.asarray(prediction.label_ids)
        metrics = classification_metrics(y_true, np.argmax(logits, -1), labels)
        return {k: metrics[k] for k in ("accuracy", "macro_f1")}

    trainer = Trainer(
        model=model,
        args=setup_args(cfg, workdir / "trainer"),
        train_dataset=data["train"],
        eval_dataset=data["validation"].sort("length"),  # less padding per batch
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - started

    model_dir = workdir / "model"
    trainer.save_model(str(model_dir))  # saves the tokenizer too (processing_class)
    params_total, params_updated, tensors_total, tensors_updated = count_updated(model, before)
    if tensors_updated < tensors_total:
        frozen = [
            n for n, p in model.named_parameters() if torch.equal(p.detach().cpu(), before[n])
        ]
        log.warning("%d parameter tensors were not updated: %s", len(frozen), frozen[:10])

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    evals = [entry for entry in trainer.state.log_history if "eval_macro_f1" in entry]
    validation = {
        k.removeprefix("eval_"): float(v)
        for k, v in (evals[-1] if evals else {}).items()
        if k.startswith("eval_")
    }
    samples = len(data["train"])
    return TrainResult(
        model_dir=str(model_dir),
        global_step=output.global_step,
        train_samples=samples,
        train_loss=float(output.training_loss),
        first_logged_loss=losses[0] if losses else None,
        last_logged_loss=losses[-1] if losses else None,
        runtime_s=runtime,
        samples_per_s=float(output.metrics.get("train_samples_per_second", 0.0)),
        params_total=params_total,
        params_updated=params_updated,
        tensors_total=tensors_total,
        tensors_updated=tensors_updated,
        validation=validation,
    )
