"""Tokenization: a fast tokenizer, batched, truncated at ``max_length``, no padding.

Padding happens per batch at collate time (``DataCollatorWithPadding``), so a batch of short tweets
costs tweet-length compute rather than ``max_length`` compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from tasks.config import ModelConfig
from tasks.sources import load_tokenizer
from tasks.split import Splits


class TokenizedData(BaseModel):
    """A ``DatasetDict`` saved to disk with ``input_ids``, ``attention_mask`` and ``labels``."""

    path: str
    rows: dict[str, int]
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


def tokenize(splits: Splits, labels: list[str], cfg: ModelConfig, workdir: Path) -> TokenizedData:
    """Tokenize the three splits and save them under ``workdir/tokenized``."""
    tokenizer = load_tokenizer(cfg.name_or_path, cfg.revision)
    paths = {
        "train": splits.train_path,
        "validation": splits.validation_path,
        "test": splits.test_path,
    }
    raw = DatasetDict({name: Dataset.from_parquet(path) for name, path in paths.items()})
    encoded = DatasetDict(
        {name: encode(ds, tokenizer, labels, cfg.max_length) for name, ds in raw.items()}
    )
    # The collator needs only token lengths; keep them to let the sampler group by length.
    encoded = encoded.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
    path = workdir / "tokenized"
    encoded.save_to_disk(str(path))
    stats = {name: ds["length"] for name, ds in encoded.items()}
    return TokenizedData(
        path=str(path),
        rows={name: len(ds) for name, ds in encoded.items()},
        mean_tokens={name: sum(v) / max(len(v), 1) for name, v in stats.items()},
        truncated_fraction={
            name: sum(n >= cfg.max_length for n in v) / max(len(v), 1) for name, v in stats.items()
        },
    )
