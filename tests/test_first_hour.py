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


def test_quiet_keeps_the_verdict_and_drops_the_progress(tiny_model_dir: Path, tmp_path: Path):
    data = tmp_path / "reviews.csv"
    make_rows(72).to_csv(data, index=False)
    args = ["--quiet", "check"]
    for item in tiny_overrides(tiny_model_dir, data, tmp_path / "home"):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ok: the settings and the data contract pass" in result.output
    assert " INFO " not in result.output, result.output


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


def test_a_server_a_run_started_stops_itself_when_unused(tmp_path: Path, monkeypatch):
    """Servers do not pile up: one started for a run stops after FULLTUNE_SERVER_IDLE unused,
    and `fulltune server list` shows it while it runs."""
    import time

    from flows.local_server import alive, ensure_server, read_info, stop_server

    monkeypatch.setenv("FULLTUNE_SERVER_IDLE", "8s")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    home = tmp_path / "home"
    try:
        info = ensure_server(home)
        listed = CliRunner().invoke(app, ["server", "list"])
        assert listed.exit_code == 0 and str(home) in listed.output, listed.output
        assert f"pid {info.pid}" in listed.output and "stop themselves after" in listed.output
        # Stopped is both: the process gone and its record removed (the reaper does it after).
        deadline = time.monotonic() + 90
        while (alive(info.pid) or read_info(home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(info.pid), "stopped after 8 s unused"
        assert read_info(home) is None
        assert "after 8 s unused" in (home / "prefect" / "server.log").read_text()
        listed = CliRunner().invoke(app, ["server", "list"])
        assert "no fulltune Prefect server is running" in listed.output
    finally:
        stop_server(home)


def test_a_server_whose_port_is_taken_starts_on_another(tmp_path: Path, monkeypatch):
    """The port a server is given can be taken before it binds it (another home's server, any
    process). That server exits; the start tries another port, and a healthy answer from the
    other process never counts as this home's server."""
    import socket

    from flows import local_server

    monkeypatch.setenv("FULLTUNE_SERVER_IDLE", "0")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    free = local_server.free_port
    monkeypatch.setattr(local_server, "free_port", lambda: next(ports, None) or free())
    home = tmp_path / "home"
    try:
        info = local_server.ensure_server(home)
        assert info.port != taken.getsockname()[1]
        assert local_server.listens(info) and local_server.answers(info)
    finally:
        local_server.stop_server(home)
        taken.close()
