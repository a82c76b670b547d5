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


def header_only(tmp: Path):
    (tmp / "data.csv").write_text("review,sentiment\n")
    return tmp / "data.csv", []


def tsv_as_csv(tmp: Path):
    return csv(rows(), tmp / "data.csv", sep="\t"), []


def png_as_csv(tmp: Path):
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    pixels = zlib.compress(b"\x00\xff\x00\x00" * 64)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 64, 8, 2, 0, 0, 0))
    (tmp / "photo.csv").write_bytes(png + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return tmp / "photo.csv", []


def five_mb_row(tmp: Path):
    frame = rows()
    frame.loc[9, "review"] = "x" * 5_000_000
    return csv(frame, tmp / "data.csv"), []


def a_directory(tmp: Path):
    (tmp / "tables").mkdir()
    csv(rows(), tmp / "tables" / "part-0.csv")
    return tmp / "tables", []


def nested_jsonl(tmp: Path):
    frame = rows()
    frame["review"] = frame["review"].astype(object)
    frame.at[3, "review"] = {"title": "great", "body": "love it"}
    frame.at[8, "review"] = ["awful", "hate"]
    frame.at[12, "review"] = 42
    path = tmp / "data.jsonl"
    frame.to_json(path, orient="records", lines=True)
    return path, []


def numeric_texts(tmp: Path):
    frame = rows()
    frame["review"] = range(1000, 1000 + len(frame))
    return csv(frame, tmp / "data.csv"), []


def wrong_dtypes_parquet(tmp: Path):
    frame = rows()
    frame["review"] = [float(i) + 0.5 for i in range(len(frame))]  # a numeric column, not text
    frame.to_parquet(tmp / "data.parquet", index=False)
    return tmp / "data.parquet", []


def missing_both_columns(tmp: Path):
    renamed = rows().rename(columns={"review": "body", "sentiment": "stars"})
    return csv(renamed, tmp / "data.csv"), []


def missing_class(tmp: Path):
    frame = rows()
    frame = frame[frame["sentiment"] != "neutral"]
    return csv(frame, tmp / "data.csv"), ["data.labels=[negative, neutral, positive]"]


def other_label_names(tmp: Path):
    frame = rows()
    frame["sentiment"] = frame["sentiment"].map({"negative": 0, "neutral": 1, "positive": 1})
    return csv(frame, tmp / "data.csv"), ["data.labels=[negative, neutral, positive]"]


def every_row_dropped(tmp: Path):
    frame = rows()
    frame["review"] = "   "
    return csv(frame, tmp / "data.csv"), ["data.on_invalid=drop"]


def setting(*overrides: str) -> Setup:
    def setup(tmp: Path):
        return csv(rows(), tmp / "data.csv"), list(overrides)

    return setup


def unwritable_home(tmp: Path):
    (tmp / "a-file").write_text("not a folder")
    return csv(rows(), tmp / "data.csv"), [f"home={tmp / 'a-file' / 'home'}"]


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
        ["data.csv", "column 'review'", "duplicate texts", "31 of 103", "row 72"],
    ),
    "train/test leakage": (
        leakage,
        ["test.csv", "leakage", "4 of 34", "also occur in the train table", "data.csv"],
    ),
    "non-UTF-8 bytes": (non_utf8, ["data.csv", "column 'review'", "encoding problems", "25 of 72"]),
    "integer labels": (
        integer_labels,
        ["data.csv", "column 'sentiment'", "label in the declared label set", "'0'"],
    ),
    "header-only CSV": (header_only, ["data.csv", "at least one row", "0 rows"]),
    "TSV named .csv": (tsv_as_csv, ["data.csv", "required column", "tab-separated"]),
    "PNG named .csv": (png_as_csv, ["photo.csv", "not a text table", "PNG image"]),
    "5 MB row": (five_mb_row, ["data.csv", "column 'review'", "length in characters", "row 9"]),
    "a directory": (a_directory, ["data.train", "tables", "is a folder"]),
    "nested JSONL values": (
        nested_jsonl,
        ["data.jsonl", "column 'review'", "text is a string", "3 of 72", "row 3"],
    ),
    "numeric-only texts": (
        numeric_texts,
        ["data.csv", "column 'review'", "text is a string", "72 of 72", "1000"],
    ),
    "parquet with wrong dtypes": (
        wrong_dtypes_parquet,
        ["data.parquet", "column 'review'", "text is a string", "72 of 72"],
    ),
    "both columns missing": (
        missing_both_columns,
        ["data.text_column", "data.label_column", "column 'review'", "column 'sentiment'"],
    ),
    "declared class missing": (
        missing_class,
        ["data.csv", "every declared label occurs", "missing: ['neutral']"],
    ),
    "labels named differently": (
        other_label_names,
        ["declares ['negative', 'neutral', 'positive']", "has ['0', '1']", "data.labels=null"],
    ),
    "every row dropped": (
        every_row_dropped,
        ["data.csv", "no rows left", "text is not empty after stripping", "72"],
    ),
    "max_length beyond the model": (
        setting("model.max_length=1024"),
        ["model.max_length", "1024", "128 positions"],
    ),
    "model not found": (setting("model.name_or_path=/no/such/model"), ["model.name_or_path"]),
    "hub model offline": (
        setting("model.name_or_path=someone/no-such-model"),
        ["model.name_or_path", "someone/no-such-model"],
    ),
    "unwritable tracking store": (
        setting("registry.tracking_uri=sqlite:////proc/fulltune/mlflow.db"),
        ["registry.tracking_uri", "cannot be created or written"],
    ),
    "reserved alias": (setting("registry.alias=latest"), ["registry.alias", "reserved"]),
    "invalid model name": (setting("registry.model_name=a/b"), ["registry.model_name", "'/'"]),
    "misspelt setting": (
        setting("train.epoch=2"),
        ["--set 'train.epoch=2'", "did you mean train.epochs?"],
    ),
    "unwritable home": (unwritable_home, ["home:", "cannot be created or written"]),
}
# Inputs that are unusual but valid: they must train and register.
ACCEPTED: dict[str, Setup] = {
    "emoji and right-to-left text": lambda tmp: (
        csv(rows().assign(review=lambda f: f["review"] + " 😀 مرحبا שלום"), tmp / "data.csv"),
        [],
    ),
    "a home that does not exist yet": lambda tmp: (
        csv(rows(), tmp / "data.csv"),
        [f"home={tmp / 'not' / 'yet' / 'home'}"],
    ),
}
# Cases where quarantining rows leaves valid data: `on_invalid: drop` must then train and register.
DROPPABLE = {
    "whitespace texts": 3,
    "30% duplicates": 31,
    "train/test leakage": 4,
    "non-UTF-8 bytes": 25,
}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory):
    """One local Prefect server (the one `fulltune run` starts for a home) for every case."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local_server import ensure_server, stop_server

    home = tmp_path_factory.mktemp("prefect-home")
    info = ensure_server(home)
    try:
        with temporary_settings(updates={PREFECT_API_URL: info.url}):
            yield info
            # Deliver the logs and events still queued for this server while it runs: queued
            # for a stopped server, they would hold up every later drain (the harness's).
            APILogWorker.drain_all()
            EventsWorker.drain_all()
    finally:
        stop_server(home)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch):
    """No network to the hub, as on this machine, without waiting on connection retries."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def run(tiny_model_dir: Path, tmp_path: Path, setup: Setup, *extra: str):
    """`fulltune run` on the case's data and overrides; (result, the home it used)."""
    data, overrides = setup(tmp_path)
    items = [*tiny_overrides(tiny_model_dir, data, tmp_path / "home"), *overrides, *extra]
    home = Path([i for i in items if i.startswith("home=")][-1].removeprefix("home="))
    args = ["run"]
    for item in items:
        args += ["--set", item]
    return CliRunner().invoke(app, args), home


def store(home: Path) -> MlflowClient | None:
    db = home / "mlflow.db"
    if not db.exists():
        return None
    uri = f"sqlite:///{db}"
    return MlflowClient(uri, registry_uri=uri)


def registered_versions(home: Path) -> list:
    client = store(home)
    return [] if client is None else client.search_model_versions()


def runs_in(home: Path, status: str) -> list:
    client = store(home)
    if client is None:
        return []
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments) if r.info.status == status]


def running_runs(home: Path) -> list:
    return runs_in(home, "RUNNING")


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input_fails_fast_and_registers_nothing(
    case: str, shared_server, hub_offline, tiny_model_dir: Path, tmp_path: Path
):
    setup, expected = MATRIX[case]
    result, home = run(tiny_model_dir, tmp_path, setup)
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in:\n{result.output}"
    assert "Traceback" not in result.output, "the cause, not a traceback"
    assert not list(home.glob("cache/tokenize/*")), "nothing is tokenized"
    assert registered_versions(home) == []
    assert running_runs(home) == [], "no run is left RUNNING"
    for failed in runs_in(home, "FAILED"):  # the MLflow UI says why, without the terminal
        assert failed.data.tags["fulltune.error"].startswith(("DataValidationError", "Source"))
    for report in home.glob("cache/validate/*/validation.json"):
        assert report.stat().st_size < 1_000_000, "examples are capped, not copied whole"


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_but_valid_input_trains_and_registers(
    case: str, shared_server, tiny_model_dir: Path, tmp_path: Path
):
    result, home = run(tiny_model_dir, tmp_path, ACCEPTED[case], "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert len(registered_versions(home)) == 1


@pytest.mark.parametrize("case", list(DROPPABLE))
def test_drop_quarantines_and_still_registers(
    case: str, shared_server, tiny_model_dir: Path, tmp_path: Path
):
    setup, _ = MATRIX[case]
    result, home = run(tiny_model_dir, tmp_path, setup, "data.on_invalid=drop", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    [version] = registered_versions(home)
    [quarantine] = home.glob("cache/validate/*/quarantine.csv")
    assert len(pd.read_csv(quarantine)) == DROPPABLE[case]
    [report] = home.glob("cache/validate/*/validation.json")
    assert sum(json.loads(report.read_text())["dropped"].values()) == DROPPABLE[case]
    assert str(version.version) == "1"
