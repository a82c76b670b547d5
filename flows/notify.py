"""Failures and promotions reach someone: flow hooks that post to a Prefect Webhook block.

Set ``notify.webhook_block`` to the name of a Prefect ``Webhook`` block (Prefect UI: *Blocks* ->
*Webhook*: a URL, a method, optional headers for a token). The ``finetune`` flow then posts a JSON
payload when a run fails and when the gate promotes a version. A webhook that cannot be reached is
logged, never turned into a failure of the run.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.config import RunConfig

log = logging.getLogger(__name__)


def post(cfg: RunConfig, event: str, payload: dict[str, Any]) -> bool:
    """POST ``payload`` (with ``event``) to the configured webhook block; whether it was sent."""
    name = cfg.notify.webhook_block
    if not name or event not in cfg.notify.events:
        return False
    from prefect.blocks.webhook import Webhook
    from prefect.utilities.asyncutils import run_coro_as_sync

    try:
        webhook: Any = Webhook.load(name)  # the block, when called outside an event loop
        response: Any = run_coro_as_sync(webhook.call({"event": event, **payload}))
        response.raise_for_status()
    except Exception as err:  # a notification must never fail the run it reports on
        log.warning("could not post %s to webhook block %r: %s", event, name, err)
        return False
    return True


def _config(flow_run: Any) -> RunConfig | None:
    try:
        return RunConfig.model_validate(flow_run.parameters.get("config") or {})
    except Exception:
        return None


def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: a failed run posts its name, id, the error and what it was training."""
    cfg = _config(flow_run)
    if cfg is None:
        return
    post(
        cfg,
        "failure",
        {
            "flow": flow.name,
            "flow_run": flow_run.name,
            "flow_run_id": str(flow_run.id),
            "state": state.name,
            "message": state.message,
            "data": cfg.data.train,
            "model": cfg.registry.model_name,
        },
    )


def on_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: a run whose version the gate promoted posts the version and the reason."""
    cfg = _config(flow_run)
    if cfg is None:
        return
    summary = state.result(raise_on_failure=False)
    decision = getattr(summary, "decision", None)
    if decision is None or not decision.promoted:
        return
    post(
        cfg,
        "promotion",
        {
            "flow_run": flow_run.name,
            "flow_run_id": str(flow_run.id),
            "model": summary.model.name,
            "version": summary.model.version,
            "alias": cfg.promote.alias,
            "reason": decision.reason,
            "mlflow_run_id": summary.mlflow_run_id,
            "mlflow_run_url": summary.mlflow_run_url,
        },
    )
