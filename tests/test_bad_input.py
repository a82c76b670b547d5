"""The bad-input matrix: each broken data set, run through `fulltune run`, fails before
tokenization with a message naming the file, column and rule, and registers nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app

from .conftest import make_rows, tiny_overrides

pytestmark = pytest.mark.flow

Setup = Callable[[Path], tuple[Path, list[str]]]


def csv(frame: pd.DataFrame, path: Path, **kw) -> Path:
    frame.to_csv(path, index=False, **kw)
    return path


def rows() -> pd.DataFrame:
    return make_rows(72)


def held_out(path: Path) -> Path:
    frame = make_rows(30, seed=9)
    frame["review"] += " held out"
    return csv(frame, path)


def missing_file(tmp: Path):
    return tmp / "nope.csv", []


def empty_file(tmp: Path):
    (tmp / "empty.csv").write_text("")
    return tmp / "empty.csv", []


def corrupt_parquet(tmp: Path):
    (tmp / "data.parquet").write_bytes(b"PAR1 this is not really parquet")
    return tmp / "data.parquet", []


def wrong_delimiter(tmp: Path):
    return csv(rows(), tmp / "semicolons.csv", sep=";"), []


def missing_text_column(tmp: Path):
    return csv(rows().rename(columns={"review": "body"}), tmp / "data.csv"), []


def missing_label_column(tmp: Path):
    return csv(rows().drop(columns="sentiment"), tmp / "data.csv"), []


def one_class(tmp: Path):
    return csv(rows().assign(sentiment="positive"), tmp / "data.csv"), []


def unknown_test_label(tmp: Path):
    test = held_out(tmp / "test.csv")
    frame = pd.read_csv(test)
    frame.loc[0, "sentiment"] = "surprised"
    csv(frame, test)
    return csv(rows(), tmp / "data.csv"), [f"data.test={test}"]


def null_texts(tmp: Path):
    frame = rows()
    frame["review"] = frame["review"].astype(object)
    frame.loc[[0, 7], "review"] = None
    path = tmp / "data.jsonl"
    frame.to_json(path, orient="records", lines=True)
    return path, []


def whitespace_texts(tmp: Path):
    frame = rows()
    frame.loc[[2, 11, 30], "review"] = "  \t "
    return csv(frame, tmp / "data.csv"), []


def huge_text(tmp: Path):
    frame = rows()
    frame.loc[5, "review"] = "word " * 200_000  # 1 MB
    return csv(frame, tmp / "data.csv"), []


def duplicates(tmp: Path):
    frame = rows()
    repeated = pd.concat([frame, frame.sample(frac=0.43, random_state=0)], ignore_index=True)
    return csv(repeated, tmp / "data.csv"), []  # 31 of 103 rows (30%) repeat an earlier one


def leakage(tmp: Path):
    train = rows()
    test = pd.concat([pd.read_csv(held_out(tmp / "held.csv")), train.head(4)])
    return csv(train, tmp / "data.csv"), [f"data.test={csv(test, tmp / 'test.csv')}"]


def non_utf8(tmp: Path):
    raw = rows().to_csv(index=False).encode()
    # Bytes that are neither UTF-8 nor printable cp1252 in 25 of the 72 rows.
    parts = raw.split(b"\n")
    for i in range(1, 26):
        parts[i] = parts[i].replace(b" ", b" \x81\x8d\x90 ", 1)
    (tmp / "data.csv").write_bytes(b"\n".join(parts) + b"\n")
    return tmp / "data.csv", []


def integer_labels(tmp: Path):
    frame = rows()
    frame["sentiment"] = frame["sentiment"].map({"negative": 0, "neutral": 1, "positive": 2})
    return csv(frame, tmp / "data.csv"), ["data.labels=[negative, neutral, positive]"]


MATRIX: dict[str, tuple[Setup, list[str]]] = {
    "missing file": (missing_file, ["nope.csv", "file not found"]),
    "empty file": (empty_file, ["empty.csv", "the file is empty"]),
    "corrupt parquet": (corrupt_parquet, ["data.parquet", "cannot be read as PARQUET"]),
    "wrong delimiter": (
        wrong_delimiter,
        [
            "semicolons.csv",
            "column 'review'",
            "required column",
            "columns found: ['review;sentiment']",
        ],
    ),
    "missing text column": (
        missing_text_column,
        ["data.csv", "column 'review'", "required column"],
    ),
    "missing label column": (
        missing_label_column,
        ["data.csv", "column 'sentiment'", "required column"],
    ),
    "one class": (one_class, ["data.csv", "column 'sentiment'", "at least two classes"]),
    "unknown test label": (
        unknown_test_label,
        ["test.csv", "column 'sentiment'", "label in the declared label set", "'surprised'"],
    ),
    "null texts": (null_texts, ["data.jsonl", "column 'review'", "text is not null", "2 of 72"]),
    "whitespace texts": (
        whitespace_texts,
        ["data.csv", "column 'review'", "not empty after stripping", "3 of 72", "row 2"],
    ),
    "1 MB text": (huge_text, ["data.csv", "column 'review'", "length in characters", "row 5"]),
    "30% duplicates": (
        duplicates,
        ["data.csv", "column '_duplicate'", "duplicate texts", "31 of 103"],
    ),
    "train/test leakage": (leakage, ["test.csv", "leakage", "4 of 34"]),
    "non-UTF-8 bytes": (non_utf8, ["data.csv", "column 'review'", "encoding problems", "25 of 72"]),
    "integer labels": (
        integer_labels,
        ["data.csv", "column 'sentiment'", "label in the declared label set", "'0'"],
    ),
}
# Cases where quarantining rows leaves valid data: `on_invalid: drop` must then train and register.
DROPPABLE = {
    "whitespace texts": 3,
    "30% duplicates": 31,
    "train/test leakage": 4,
    "non-UTF-8 bytes": 25,
}


def run(tiny_model_dir: Path, tmp_path: Path, setup: Setup, *extra: str):
    data, overrides = setup(tmp_path)
    args = ["run"]
    for item in [*tiny_overrides(tiny_model_dir, data, tmp_path / "home"), *overrides, *extra]:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def registered_versions(home: Path) -> list:
    db = home / "mlflow.db"
    if not db.exists():
        return []
    uri = f"sqlite:///{db}"
    return MlflowClient(uri, registry_uri=uri).search_model_versions()


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input_fails_fast_and_registers_nothing(
    case: str, prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    setup, expected = MATRIX[case]
    result = run(tiny_model_dir, tmp_path, setup)
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in:\n{result.output}"
    assert not list((tmp_path / "home").glob("cache/tokenize/*")), "nothing is tokenized"
    assert registered_versions(tmp_path / "home") == []


@pytest.mark.parametrize("case", list(DROPPABLE))
def test_drop_quarantines_and_still_registers(
    case: str, prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    setup, _ = MATRIX[case]
    result = run(tiny_model_dir, tmp_path, setup, "data.on_invalid=drop", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    [version] = registered_versions(tmp_path / "home")
    [quarantine] = (tmp_path / "home").glob("cache/validate/*/quarantine.csv")
    assert len(pd.read_csv(quarantine)) == DROPPABLE[case]
    [report] = (tmp_path / "home").glob("cache/validate/*/validation.json")
    assert sum(json.loads(report.read_text())["dropped"].values()) == DROPPABLE[case]
    assert version.version == 1 or str(version.version) == "1"
