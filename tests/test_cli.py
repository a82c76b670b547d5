"""The `fulltune` command as a user types it."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

from .conftest import tiny_overrides


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.flow
def test_malformed_file_exits_non_zero_and_names_the_problem(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,mood\nlovely day,positive\nawful,negative\n,neutral\n")
    args = []
    for item in tiny_overrides(tiny_model_dir, bad, tmp_path):
        args += ["--set", item]
    result = run_cli("run", *args)
    assert result.exit_code != 0
    assert "bad.csv" in result.output
    assert "column 'sentiment'" in result.output
    assert "required column" in result.output
    # Nothing was trained, so nothing was saved.
    assert not list(tmp_path.glob("work/*/model"))


def test_invalid_config_value_exits_non_zero_naming_the_field():
    result = run_cli("run", "--set", "train.learning_rate=-3")
    assert result.exit_code == 1
    assert "train.learning_rate" in result.output


def test_unreadable_config_file():
    result = run_cli("run", "--config", "does-not-exist.yaml")
    assert result.exit_code == 1
    assert "config file not found: does-not-exist.yaml" in result.output


def test_metadata_commands_do_not_import_the_training_stack():
    """`--help`, `lineage` and `promote` only read metadata: torch and transformers (most of a
    cold start) stay unimported. Speed is measured in the note, not asserted."""
    import subprocess
    import sys

    probe = (
        "import sys; import flows.cli, tasks.register, tasks.promote; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
