"""Tokenization: a fast tokenizer, batched, no padding; the task's kind decides the examples.

Padding happens per batch at collate time, so a batch of short tweets costs tweet-length compute
rather than ``max_length`` compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks.config import ModelConfig
from tasks.results import Splits, TokenizedData

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tasks.kinds import Kind


def tokenize(
    splits: Splits,
    labels: list[str],
    cfg: ModelConfig,
    workdir: Path,
    kind: Kind,
    tokenizer: PreTrainedTokenizerBase,
) -> TokenizedData:
    """Tokenize the three splits the task's way and save them under ``workdir/tokenized``.

    The kind's ``encode`` returns ``input_ids``, ``labels``, ``length`` (tokens per example, for
    length-grouped batching), per split.
    """
    from datasets import Dataset, DatasetDict

    paths = {
        "train": splits.train_path,
        "validation": splits.validation_path,
        "test": splits.test_path,
    }
    raw = DatasetDict({name: Dataset.from_parquet(path) for name, path in paths.items()})
    encoded = DatasetDict(
        {name: kind.encode(ds, tokenizer, labels, cfg) for name, ds in raw.items()}
    )
    path = workdir / "tokenized"
    encoded.save_to_disk(str(path))
    lengths = {name: ds["length"] for name, ds in encoded.items()}
    return TokenizedData(
        path=str(path),
        rows={name: len(ds) for name, ds in encoded.items()},
        tokens={name: int(sum(v)) for name, v in lengths.items()},
        mean_tokens={name: sum(v) / max(len(v), 1) for name, v in lengths.items()},
    )
