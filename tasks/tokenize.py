"""Tokenization: a fast tokenizer, batched, no padding; the task's kind decides the examples.

Padding happens per batch at collate time, so a batch of short tweets costs tweet-length compute
rather than ``max_length`` compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from tasks.config import ModelConfig
from tasks.kinds import Kind
from tasks.sources import load_tokenizer
from tasks.split import Splits


class TokenizedData(BaseModel):
    """A ``DatasetDict`` on disk: ``input_ids``, ``attention_mask``, ``labels``, ``length``."""

    path: str
    rows: dict[str, int]
    tokens: dict[str, int]  # non-pad tokens per split
    mean_tokens: dict[str, float]
    truncated_fraction: dict[str, float]


def encode(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, labels: list[str], max_length: int
) -> Dataset:
    """Map ``text``/``label`` rows to token ids and integer labels (batched, no padding)."""
    label2id = {label: i for i, label in enumerate(labels)}

    def _encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        encoded["labels"] = [label2id[label] for label in batch["label"]]
        return encoded

    return dataset.map(_encode, batched=True, remove_columns=dataset.column_names)


def tokenize(
    splits: Splits, labels: list[str], cfg: ModelConfig, workdir: Path, kind: Kind
) -> TokenizedData:
    """Tokenize the three splits the task's way and save them under ``workdir/tokenized``.

    The kind's ``encode`` returns ``input_ids``, ``labels``, ``length`` (tokens per example, for
    length-grouped batching) and ``truncated`` (whether text was cut), per split.
    """
    tokenizer = load_tokenizer(cfg.name_or_path, cfg.revision)
    paths = {
        "train": splits.train_path,
        "validation": splits.validation_path,
        "test": splits.test_path,
    }
    raw = DatasetDict({name: Dataset.from_parquet(path) for name, path in paths.items()})
    encoded = DatasetDict(
        {name: kind.encode(ds, tokenizer, labels, cfg) for name, ds in raw.items()}
    )
    truncated = {name: ds["truncated"] for name, ds in encoded.items()}
    encoded = encoded.remove_columns("truncated")
    path = workdir / "tokenized"
    encoded.save_to_disk(str(path))
    lengths = {name: ds["length"] for name, ds in encoded.items()}
    return TokenizedData(
        path=str(path),
        rows={name: len(ds) for name, ds in encoded.items()},
        tokens={name: int(sum(v)) for name, v in lengths.items()},
        mean_tokens={name: sum(v) / max(len(v), 1) for name, v in lengths.items()},
        truncated_fraction={name: sum(v) / max(len(v), 1) for name, v in truncated.items()},
    )
