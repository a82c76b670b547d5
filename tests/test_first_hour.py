"""What a newcomer meets first: `fulltune check` before any run, `--version`, a quiet terminal."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

from .conftest import make_rows, tiny_overrides


def check(tiny_model_dir: Path, tmp_path: Path, *extra: str):
    data = tmp_path / "reviews.csv"
    make_rows(72).to_csv(data, index=False)
    args = ["check"]
    for item in [*tiny_overrides(tiny_model_dir, data, tmp_path / "home"), *extra]:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def test_check_passes_good_data_without_a_run(tiny_model_dir: Path, tmp_path: Path):
    result = check(tiny_model_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert "ok: the settings and the data contract pass" in result.output
    assert "'train': 72" in result.output
    home = tmp_path / "home"
    assert not (home / "mlflow.db").exists(), "no MLflow run, no store"
    assert not (home / "prefect").exists(), "no Prefect server"


def test_check_names_a_wrong_column_with_the_nearest(tiny_model_dir: Path, tmp_path: Path):
    result = check(tiny_model_dir, tmp_path, "data.label_column=sentimnt")
    assert result.exit_code == 1
    assert "data.label_column: required column 'sentimnt'" in result.output
    assert "did you mean 'sentiment' (--set data.label_column=sentiment)?" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_check_runs_the_data_contract(tiny_model_dir: Path, tmp_path: Path):
    data = tmp_path / "reviews.csv"
    frame = make_rows(72)
    frame.loc[[2, 5], "review"] = "   "
    frame.to_csv(data, index=False)
    args = ["check"]
    for item in tiny_overrides(tiny_model_dir, data, tmp_path / "home"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "not empty after stripping" in result.output and "2 of 72" in result.output


def test_version_names_the_stack_and_the_device():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    for name in ("fulltune", "torch", "transformers", "prefect", "mlflow", "device"):
        assert name in result.output
