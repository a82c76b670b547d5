"""Operations: serve the deployments, the home's local Prefect server, the benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli_base import app, fail, load, setup_logging

if TYPE_CHECKING:
    from tasks.config import RunConfig


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Default config of the deployments (the demo's)."),
    ] = None,
    allow: Annotated[
        list[Path] | None,
        typer.Option(
            "--allow",
            help="A folder triggered runs may read data from and keep their home in "
            "(repeatable; default: the config's home and data folders).",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Runs of each deployment that may train at once.")
    ] = 1,
    timezone: Annotated[
        str, typer.Option(help="IANA time zone of the nightly schedule (FULLTUNE_TIMEZONE).")
    ] = os.environ.get("FULLTUNE_TIMEZONE", "UTC"),
) -> None:
    """Serve the `finetune/nightly` (cron) and `finetune/adhoc` deployments from this machine.

    Anyone who can reach the Prefect API can trigger `adhoc` with their own parameters, so runs
    are confined: data, model and home paths outside the allowed folders, and any tracking store
    but the config's, are refused before anything runs.
    """
    from prefect import serve as prefect_serve

    from flows.deploy import deployments
    from flows.local_server import prefect_api
    from tasks.preflight import ALLOWED_ROOTS_ENV, ALLOWED_TRACKING_ENV

    cfg = load(config, None)
    roots = [p.resolve() for p in allow] if allow else default_roots(cfg)
    os.environ[ALLOWED_ROOTS_ENV] = os.pathsep.join(map(str, roots))
    os.environ[ALLOWED_TRACKING_ENV] = cfg.tracking_uri()
    typer.echo(f"runs confined to: {', '.join(map(str, roots))}")
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # prefect's serve shuts down cleanly on it (as on Ctrl-C)

    signal.signal(signal.SIGTERM, stop)
    try:
        with prefect_api(cfg.home_dir()) as url:
            typer.echo(f"serving on the Prefect API at {url}")
            prefect_serve(*deployments(config, concurrency, timezone))
    except KeyboardInterrupt:  # a stop that arrived before (or after) prefect's serve took it
        pass
    except SystemExit as exit_:  # prefect's runner exits 0 on a SIGTERM before it has started
        if exit_.code:
            raise
    typer.echo("stopped serving")


def default_roots(cfg: RunConfig) -> list[Path]:
    """The served config's home and the folders its local data and model live in."""

    roots = [cfg.home_dir()]
    names = [cfg.data.train, cfg.data.validation, cfg.data.test, cfg.model.name_or_path]
    for name in names:
        if name is None or name.startswith("pkg://"):
            continue
        path = Path(name).expanduser()
        if path.exists():
            roots.append(path.resolve() if path.is_dir() else path.resolve().parent)
    return list(dict.fromkeys(roots))


server_app = typer.Typer(help="The home's local Prefect server, shared by every run.")
app.add_typer(server_app, name="server")
HomeOption = Annotated[Path, typer.Option("--home", help="The fulltune home whose server this is.")]


@server_app.command("start")
def server_start(home: HomeOption = Path(".fulltune")) -> None:
    """Start the home's Prefect server (or find the running one) and print its URLs."""
    from flows.local_server import ServerError, ensure_server

    try:
        info = ensure_server(home.resolve(), stays=True)  # started by hand: stopped by hand
    except ServerError as err:
        fail(str(err))
    typer.echo(f"Prefect API: {info.url}\nPrefect UI:  {info.ui_url}\npid:         {info.pid}")


@server_app.command("stop")
def server_stop(home: HomeOption = Path(".fulltune")) -> None:
    """Stop the home's Prefect server (its flow runs stay in its database)."""
    from flows.local_server import stop_server

    stopped = stop_server(home.resolve())
    typer.echo(f"stopped pid {stopped.pid}" if stopped else "no server was running")


@server_app.command("list")
def server_list() -> None:
    """Every running fulltune Prefect server of this user: its home, UI, pid and idle time."""
    from flows.local_server import idle_limit_s, running_servers

    servers = running_servers()
    if not servers:
        typer.echo("no fulltune Prefect server is running")
        return
    for s in servers:
        idle = float(s["idle_s"])  # type: ignore[arg-type]
        typer.echo(
            f"{s['home']}  http://127.0.0.1:{s['port']}  pid {s['pid']}  unused {idle / 60:.0f} min"
        )
    limit = idle_limit_s()
    rule = f"after {limit / 60:.0f} min unused" if limit else "never (FULLTUNE_SERVER_IDLE=0)"
    typer.echo(f"(servers started by a run stop themselves {rule}; `server start` ones stay)")


@server_app.command("status")
def server_status(home: HomeOption = Path(".fulltune")) -> None:
    """Print whether the home's Prefect server runs, and where."""
    from flows.local_server import describe

    for key, value in describe(home.resolve()).items():
        typer.echo(f"{key:<10}  {value}")


@app.command()
def bench(
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON object.")] = False,
    steps: Annotated[int, typer.Option(min=2, help="Optimizer steps of (a) and (b).")] = 40,
    seed_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of (c).")] = 3,
    overhead: Annotated[
        bool, typer.Option(help="Also time a whole `fulltune run` for the overhead.")
    ] = True,
    sft_steps: Annotated[
        int,
        typer.Option(
            min=0, help="Steps of each SFT arm on SmolLM2 (packed, padded, bare TRL); 0 skips."
        ),
    ] = 0,
    dpo_steps: Annotated[
        int,
        typer.Option(min=0, help="Steps of each DPO arm on SmolLM2 (fulltune, bare TRL); 0 skips."),
    ] = 0,
    repeats: Annotated[
        int, typer.Option(min=1, help="Repetitions of (a), (b), (c), interleaved; medians shown.")
    ] = 3,
    settings_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Steps per training-step setting (precision, attention, fused AdamW, "
            "torch.compile, threads, batch order); 0 skips.",
        ),
    ] = 10,
    memory: Annotated[
        bool,
        typer.Option(
            help="Also the memory rows: each option of the memory plan on a 360M Llama, and the "
            "largest Llama whose step fits here (minutes; most of the free memory)."
        ),
    ] = False,
) -> None:
    """Measure training throughput, MFU, memory and overhead against bare HF Trainer recipes."""
    import json

    from bench.harness import benchmark, table

    setup_logging()
    result = benchmark(
        steps,
        seed_steps,
        overhead,
        sft_steps,
        repeats,
        dpo_steps=dpo_steps,
        settings_steps=settings_steps,
        memory=memory,
    )
    if not as_json:
        typer.echo(table(result))
    typer.echo(json.dumps(result, default=float))
