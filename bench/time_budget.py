"""How well ``train.time_budget`` holds end to end: whole ``fulltune run``s against their budgets.

Each case is a shipped config given a budget; it runs on an idle machine and, with ``--busy``,
beside a process that keeps one core busy (what a shared 2-core machine sees). Every run gets a
fresh home (its own store and Prefect server, so no run meets another's cache), and the table
reads the run's ``plan/*`` metrics back from its MLflow store::

    .venv/bin/python -m bench.time_budget [--busy] [--case NAME ...] [--json FILE]

``plan/run_s`` is the flow run's clock (what the budget covers); ``wall_s`` is the command's,
its start-up included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES: dict[str, tuple[str, str, list[str]]] = {
    # name: (config, budget, extra settings)
    "classifier-3m": ("configs/demo.yaml", "3m", []),
    "classifier-6m": ("configs/demo.yaml", "6m", ["train.max_train_samples=30000"]),
    "causal-lm-3m": ("configs/clm-demo.yaml", "3m", []),
    "sft-6m": ("configs/sft-demo.yaml", "6m", ["train.max_train_samples=2000"]),
    "sft-4m": ("configs/sft-demo.yaml", "4m", []),
}
SHOWN = ("budget_s", "run_s", "run_over_budget", "spent_before_training_s", "reserve_s",
         "after_training_s", "actual_s", "steps", "revised_steps", "actual_steps", "revisions",
         "step_s", "measured_step_s", "test_scoring_s")  # fmt: skip


def spin() -> None:
    while True:
        pass


def run_case(name: str, home: Path) -> dict[str, float]:
    from mlflow import MlflowClient

    config, budget, extra = CASES[name]
    settings = [f"home={home}", f"train.time_budget={budget}", *extra]
    command = [str(Path(sys.executable).parent / "fulltune"), "run", "--config", config]
    started = time.time()
    done = subprocess.run(
        [*command, *(f"--set={s}" for s in settings)], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.time() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = {k.removeprefix("plan/"): v for k, v in run.data.metrics.items() if "plan/" in k}
    stages = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
    scoring = run.data.metrics.get("efficiency/test_scoring_s")
    return {"wall_s": wall, **metrics, **stages, "test_scoring_s": scoring}


def main() -> None:
    from flows.local_server import stop_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--busy", action="store_true", help="one core kept busy meanwhile")
    parser.add_argument("--json", type=Path, help="append the results here, one line a run")
    args = parser.parse_args()
    rows = []
    for name in args.case or list(CASES):
        neighbour = multiprocessing.Process(target=spin, daemon=True) if args.busy else None
        if neighbour:
            neighbour.start()
        try:
            with tempfile.TemporaryDirectory(prefix="fulltune-budget-") as home:
                try:
                    row = {"case": name, "busy": args.busy} | run_case(name, Path(home))
                finally:  # its Prefect server, not left to stop itself idle beside the next run
                    stop_server(Path(home))
        finally:
            if neighbour:
                neighbour.terminate()
        rows.append(row)
        line = "  ".join(f"{k}={row[k]:.3g}" for k in SHOWN if k in row)
        print(f"{name} ({'busy' if args.busy else 'idle'}): wall_s={row['wall_s']:.0f}  {line}")
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
