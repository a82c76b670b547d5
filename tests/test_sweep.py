"""A 3-trial Optuna sweep on the tiny model: nested runs, and the best one registered."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.sweep import sweep
from tasks.config import load_config

from .conftest import make_rows, tiny_overrides

pytestmark = pytest.mark.flow


def test_sweep_runs_nested_trials_and_registers_the_best(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    data = tmp_path / "rows.csv"
    make_rows(72).to_csv(data, index=False)
    overrides = [
        *tiny_overrides(tiny_model_dir, data, tmp_path),
        "train.max_steps=12",
        "registry.model_name=tiny-sweep",
    ]
    cfg = load_config(None, overrides)
    summary = sweep(config=cfg, trials=3)

    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    children = client.search_runs(
        [client.get_experiment_by_name("fulltune").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'",
    )
    assert len(children) == 3
    assert {r.data.params["train.learning_rate"] for r in children} == {
        str(t.params["learning_rate"]) for t in summary.trials
    }
    completed = [t for t in summary.trials if not t.pruned]
    best = max(completed, key=lambda t: t.value)
    assert summary.best_params == best.params
    final = client.get_run(summary.final.mlflow_run_id)
    assert final.data.tags["sweep.parent_run_id"] == summary.parent_run_id
    assert float(final.data.params["train.learning_rate"]) == best.params["learning_rate"]
    [version] = client.search_model_versions("name='tiny-sweep'")
    assert version.run_id == summary.final.mlflow_run_id


def test_an_interrupted_sweep_continues_its_study(tmp_path: Path):
    """The study lives in SQLite beside the MLflow store: opening it again finds the trials done."""
    import optuna

    from flows.sweep import finished_trials, open_study, suggest

    cfg = load_config(
        None,
        [f"home={tmp_path}", "sweep.space={learning_rate: {low: 0.0001, high: 0.001, log: true}}"],
    )
    first = open_study(cfg, "data-v1", maximize=True)
    for value in (0.5, 0.7):
        trial = first.ask()
        assert set(suggest(trial, cfg.sweep.space)) == {"learning_rate"}
        first.tell(trial, value)
    # The process dies here; the next `fulltune sweep` of the same config and data:
    again = open_study(cfg, "data-v1", maximize=True)
    assert [t.value for t in finished_trials(again)] == [0.5, 0.7]
    assert (tmp_path / "optuna.db").exists()
    assert finished_trials(open_study(cfg, "data-v2", maximize=True)) == [], "other data"
    assert optuna.get_all_study_names(cfg.optuna_storage())


def test_the_search_space_is_checked_like_any_setting():
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match="are not train settings"):
        load_config(None, ["sweep.space={learning_rat: {low: 0.1, high: 0.2}}"])
    with pytest.raises(ConfigError, match="needs `choices`"):
        load_config(None, ["sweep.space={learning_rate: {low: 0.2}}"])
