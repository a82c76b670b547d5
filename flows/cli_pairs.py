"""``fulltune pairs``: preference pairs from a registered model's own mistakes."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from flows.cli_base import ConfigOption, OverridesOption, app, fail, load, use_tracking, validated


class Split(StrEnum):
    train = "train"
    validation = "validation"
    test = "test"
    unused = "unused"


@app.command()
def pairs(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="models:/NAME@ALIAS: whose mistakes make the pairs."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the pairs go (JSONL).")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Instruction data with reference answers (the sft formats); default: the "
            "config's data.train.",
        ),
    ] = None,
    split: Annotated[
        Split | None,
        typer.Option(
            help="Only the rows an sft run with this config puts in that split, after its data "
            "contract: `unused` is the training rows outside train.max_train_samples, `test` the "
            "rows its evaluation judges (eval.max_test_samples). Default: every row.",
        ),
    ] = None,
    max_prompts: Annotated[
        int | None, typer.Option(min=1, help="A seeded subset of this many prompts.")
    ] = None,
    share_right: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of the prompts it answers right that still give a pair (its most likely "
            "wrong answer rejected; closed answer sets only).",
        ),
    ] = 0.0,
    config: ConfigOption = None,
    overrides: OverridesOption = None,
) -> None:
    """Preference pairs from a registered model's own mistakes, for a `task: dpo` run: the
    reference answer chosen, the model's wrong answer rejected. Recorded as an MLflow run."""
    import tempfile

    from mlflow import MlflowClient

    from tasks import tracking
    from tasks.kinds.dpo import build_pairs, conversations
    from tasks.kinds.sft import conversations_of, scored_rows
    from tasks.sources import SourceError
    from tasks.split import split_frames

    cfg = load(config, [*(overrides or []), *([f"data.train={data}"] if data else [])])
    if split is not None and cfg.task != "sft":
        fail(f"--split reads the splits of an sft run; the config's task is {cfg.task!r}")
    uri = use_tracking(cfg.tracking_uri())
    seed = cfg.train.seed
    try:
        with tempfile.TemporaryDirectory(prefix="fulltune-pairs-") as staging:
            if split is None:
                chats = conversations(cfg.data)
            else:
                checked = validated(cfg, Path(staging))
                frames = split_frames(checked, cfg.data, cfg.train.max_train_samples, seed)
                chats = conversations_of(frames[split.value])
                if split is Split.test:  # the rows the run's evaluation judged, in its order
                    kept = scored_rows(len(chats), cfg.eval.max_test_samples, seed)
                    chats = [chats[i] for i in kept]
            chats = [chats[i] for i in scored_rows(len(chats), max_prompts, seed)]
            built, pinned = build_pairs(
                model, chats, cfg.data, cfg.model, cfg.eval, Path(staging), share_right, seed
            )
    except (SourceError, OSError) as err:
        fail(str(err))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        built.write(out)
    except OSError as err:
        fail(f"--out {out}: cannot be written: {err.strerror or err}")
    # The file is written whole or not at all, and the run recorded once it is there.
    run_id = tracking.start_run(
        cfg,
        {
            "fulltune.task": "pairs",
            "lineage.source_model": pinned,
            "pairs.out": str(out),
            "pairs.share_right": str(share_right),
            "pairs.split": split.value if split else "all",
        },
        f"pairs-{out.stem}",
    )
    tracking.log_metrics(run_id, built.metrics())
    tracking.log_artifact(run_id, out, "pairs")
    tracking.end_run(run_id, "FINISHED")
    experiment = MlflowClient(uri, registry_uri=uri).get_run(run_id).info.experiment_id
    accuracy = built.right / max(built.prompts, 1)
    typer.echo(
        f"wrote {len(built.rows)} pairs from {built.prompts} prompts to {out} ({pinned} answered "
        f"{built.right} right: {accuracy:.1%})"
    )
    served = "" if tracking.ui_base(uri)[1] else " (after `make ui`)"
    typer.echo(f"MLflow run:       {tracking.run_page(uri, experiment, run_id)}{served}")
