"""Deployments of the ``finetune`` flow: a nightly retraining schedule and an ad-hoc trigger.

``fulltune serve`` serves both from this machine against the Prefect API in ``PREFECT_API_URL``
(``prefect server start`` locally). ``infra/prefect.yaml`` declares the same two deployments for
``prefect deploy`` onto a work pool (process, Docker or Kubernetes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flows.finetune import finetune
from tasks.config import DEMO_CONFIG, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Nightly at 02:00 in FULLTUNE_TIMEZONE (an IANA name; UTC unless set): retrain on whatever the
# data path holds now.
NIGHTLY_CRON = os.environ.get("FULLTUNE_NIGHTLY_CRON", "0 2 * * *")
TIMEZONE = os.environ.get("FULLTUNE_TIMEZONE", "UTC")


def deployments(
    config: Path | None = None, concurrency: int = 1, timezone: str = TIMEZONE
) -> list[Any]:
    """The scheduled and the ad-hoc deployment, both defaulting to ``config`` (the demo's).

    Parameters are the flow's pydantic config, so the Prefect UI shows a validated form with every
    field's default and description, and a run can override any of them. At most ``concurrency``
    runs of each deployment train at once; later ones wait in Prefect's queue (a nightly run and a
    manual one queue instead of fighting for the cores).
    """
    from prefect.schedules import Cron

    cfg = load_config(config or DEMO_CONFIG)
    # A relative home would mean wherever each run's process happens to start: resolve it now.
    cfg = cfg.model_copy(update={"home": str(cfg.home_dir())})
    # Where a run's process runs (its machine's place in a multi-node run) is the environment's
    # to say, on the machine that runs it: the deployment leaves those settings out.
    place = {"train": {"nnodes", "node_rank", "rdzv_endpoint"}}
    parameters = {"config": cfg.redacted().model_dump(mode="json", exclude=place)}
    nightly = finetune.to_deployment(
        name="nightly",
        schedules=[Cron(NIGHTLY_CRON, timezone=timezone)],
        concurrency_limit=concurrency,
        parameters=parameters,
        description=f"Nightly full fine-tuning on the configured data path, gated promotion: "
        f"cron `{NIGHTLY_CRON}` in the {timezone} time zone.",
        tags=["fulltune", "scheduled"],
    )
    adhoc = finetune.to_deployment(
        name="adhoc",
        concurrency_limit=concurrency,
        parameters=parameters,
        description="Fine-tune on demand: trigger from the UI or `prefect deployment run`.",
        tags=["fulltune", "adhoc"],
    )
    return [nightly, adhoc]
