from pathlib import Path

import pandas as pd
import pytest

from tasks.split import SplitError, split_data, split_frames, stratified_split

from .conftest import data_config, make_rows, validate


def test_split_is_deterministic_stratified_and_disjoint(tiny_csv: Path, tmp_path: Path):
    cfg = data_config(tiny_csv, validation_fraction=0.125, test_fraction=0.125)
    data = validate(cfg, tmp_path / "a")
    first = split_data(data, cfg, tmp_path / "a", None, 42)
    second = split_data(data, cfg, tmp_path / "a", None, 42)
    assert first == second
    assert first.rows == {"train": 54, "validation": 9, "test": 9}
    assert first.label_counts["test"] == {"negative": 3, "neutral": 3, "positive": 3}
    texts = {
        name: set(pd.read_parquet(getattr(first, f"{name}_path"))["text"])
        for name in ("train", "validation", "test")
    }
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert sum(len(t) for t in texts.values()) == 72


def test_unused_rows_are_the_training_rows_outside_the_subset(tiny_csv: Path, tmp_path: Path):
    cfg = data_config(tiny_csv, validation_fraction=0.125, test_fraction=0.125)
    data = validate(cfg, tmp_path)
    whole = split_frames(data, cfg, None, 42)
    frames = split_frames(data, cfg, 20, 42)
    written = split_data(data, cfg, tmp_path, 20, 42)
    assert pd.read_parquet(written.train_path).equals(frames["train"])
    assert whole["unused"].empty and len(frames["unused"]) == 54 - 20
    texts = {name: set(frame["text"]) for name, frame in frames.items()}
    assert texts["train"] | texts["unused"] == set(whole["train"]["text"])
    assert not texts["train"] & texts["unused"]
    assert texts["test"] == set(whole["test"]["text"])  # the held-out rows do not move


def test_given_test_file_is_used_as_is(tiny_csv: Path, tmp_path: Path):
    test = tmp_path / "test.csv"
    held = make_rows(36, seed=5)
    held["review"] += " held out"
    held.to_csv(test, index=False)
    cfg = data_config(tiny_csv, test=str(test))
    splits = split_data(validate(cfg, tmp_path), cfg, tmp_path, None, 42)
    assert splits.rows["test"] == 36
    assert splits.rows["train"] + splits.rows["validation"] == 72


def test_repeated_texts_stay_on_one_side_of_the_split():
    frame = pd.DataFrame({"text": [f"t{i % 20}" for i in range(60)], "label": ["a", "b"] * 30})
    rest, held = stratified_split(frame, 0.25, 0, "test")
    assert not set(rest["text"]) & set(held["text"])
    assert len(rest) + len(held) == 60


def test_too_few_rows_per_class_is_explained():
    frame = pd.DataFrame({"text": list("abcd"), "label": ["x", "x", "x", "y"]})
    with pytest.raises(SplitError, match="label counts"):
        stratified_split(frame, 0.25, 0, "test")
