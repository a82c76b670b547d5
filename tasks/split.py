"""Deterministic, stratified train/validation/test splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from tasks.config import DataConfig
from tasks.results import Splits, ValidatedData


class SplitError(ValueError):
    """The data is too small or too skewed to split as configured."""


def stratified_split(
    frame: pd.DataFrame, fraction: float, seed: int, what: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off ``fraction`` of the rows, keeping each label's share, reproducibly.

    Identical texts always land on the same side, so a repeated text can never leak from the
    training split into a held-out one. A table without labels (causal LM) is split at random.
    """
    unique = frame.drop_duplicates("text")
    labelled = "label" in frame
    try:
        _, held_texts = train_test_split(
            unique["text"],
            test_size=fraction,
            random_state=seed,
            stratify=unique["label"] if labelled else None,
        )
    except ValueError as err:
        counts = frame["label"].value_counts().to_dict() if labelled else {}
        raise SplitError(
            f"cannot carve a stratified {what} split of {fraction:.0%} from {len(frame)} rows "
            f"with label counts {counts}: {err}. Add rows, or give data.{what} explicitly."
        ) from err
    is_held = frame["text"].isin(set(held_texts))
    rest, held = frame[~is_held], frame[is_held]
    return rest.reset_index(drop=True), held.reset_index(drop=True)


def split_frames(
    data: ValidatedData, cfg: DataConfig, max_train_samples: int | None, sample_seed: int
) -> dict[str, pd.DataFrame]:
    """The train, validation and test tables, and ``unused``: training rows outside the subset.

    The split depends only on the data and ``cfg.split_seed``: the same inputs give the same
    splits on every machine, so the test split never leaks into training or model selection.
    With ``max_train_samples``, the train split is a seeded random subset *after* the held-out
    splits are carved, so those stay the same; the rest of the training rows is ``unused``
    (what `fulltune pairs --split unused` builds pairs from).
    """
    train = pd.read_parquet(data.train_path)
    test = pd.read_parquet(data.test_path) if data.test_path else None
    validation = pd.read_parquet(data.validation_path) if data.validation_path else None
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, cfg.split_seed, "test")
    if validation is None:
        # Rescale so the validation split is validation_fraction of the original train table.
        share = cfg.validation_fraction / (1 - (0 if data.test_path else cfg.test_fraction))
        train, validation = stratified_split(train, share, cfg.split_seed, "validation")
    unused = train.iloc[:0]
    if max_train_samples is not None and max_train_samples < len(train):
        picked = train.sample(n=max_train_samples, random_state=sample_seed)
        unused = train.drop(index=picked.index).reset_index(drop=True)
        train = picked.reset_index(drop=True)
    return {"train": train, "validation": validation, "test": test, "unused": unused}


def split_data(
    data: ValidatedData,
    cfg: DataConfig,
    workdir: Path,
    max_train_samples: int | None,
    sample_seed: int,
) -> Splits:
    """Carve validation and test splits out of train unless they were given (``split_frames``),
    and write them where every later stage (tokenization, training, the TF-IDF baseline) reads
    the same rows."""
    frames = split_frames(data, cfg, max_train_samples, sample_seed)
    del frames["unused"]
    paths = {}
    for name, frame in frames.items():
        paths[name] = str(workdir / f"{name}.parquet")
        frame.to_parquet(paths[name], index=False)
    return Splits(
        train_path=paths["train"],
        validation_path=paths["validation"],
        test_path=paths["test"],
        rows={name: len(frame) for name, frame in frames.items()},
        label_counts={
            name: {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
            for name, frame in frames.items()
            if "label" in frame
        },
    )
