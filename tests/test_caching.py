"""Validation and tokenization are cached by content across runs, and only by content."""

from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.finetune import finetune
from tasks import caching
from tasks.config import load_config
from tasks.results import TokenizedData

from .conftest import make_rows, tiny_overrides

pytestmark = pytest.mark.flow


def task_states(flow_state) -> dict[str, str]:
    """Task name -> state name for one flow run, read back from the Prefect API."""
    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def test_same_inputs_hit_the_cache_and_any_change_misses(
    prefect_harness, tiny_model_dir: Path, tmp_path: Path
):
    data = tmp_path / "rows.csv"
    make_rows(72).to_csv(data, index=False)
    base = [
        *tiny_overrides(tiny_model_dir, data, tmp_path),
        "train.max_steps=2",
        "promote.enabled=false",
    ]

    def run(*extra: str) -> dict[str, str]:
        state = finetune(config=load_config(None, [*base, *extra]), return_state=True)
        assert state.is_completed(), state
        return task_states(state)

    first = run()
    assert first["validate_data"] == first["tokenize"] == "Completed"
    second = run()
    assert second["validate_data"] == second["tokenize"] == "Cached"
    assert second["train"] == "Completed"  # training is never skipped
    longer = run("model.max_length=24")
    assert longer["validate_data"] == longer["tokenize"] == "Completed"
    make_rows(75).to_csv(data, index=False)
    changed = run()
    assert changed["validate_data"] == changed["tokenize"] == "Completed"
    # A deleted cache entry is recomputed, not trusted.
    for done in (tmp_path / "cache").glob("*/*/DONE"):
        done.unlink()
    again = run()
    assert again["validate_data"] == again["tokenize"] == "Completed"


def test_a_cache_hit_never_crosses_homes(prefect_harness, tiny_model_dir: Path, tmp_path: Path):
    """Two projects with the same data and settings: each computes and reads its own results,
    and deleting one project leaves the other working."""
    import shutil

    data = tmp_path / "rows.csv"
    make_rows(72).to_csv(data, index=False)

    def run(home: Path) -> dict[str, str]:
        overrides = [*tiny_overrides(tiny_model_dir, data, home), "train.max_steps=2"]
        state = finetune(
            config=load_config(None, [*overrides, "promote.enabled=false"]), return_state=True
        )
        assert state.is_completed(), state
        return task_states(state)

    first, second = tmp_path / "project-a", tmp_path / "project-b"
    assert run(first)["validate_data"] == "Completed"
    assert run(second)["validate_data"] == "Completed", "another home computes its own"
    shutil.rmtree(first)
    assert run(second)["validate_data"] == "Cached", "and reuses it, with the first one gone"
    for result in (second / "cache" / "results").iterdir():
        stored = result.read_text()
        assert str(first) not in stored
        assert '"serializer":{"type":"json"' in stored.replace(" ", "")  # JSON, not a pickle


def test_runs_building_one_entry_at_once_never_remove_a_published_one(tmp_path: Path):
    folder = tmp_path / "cache" / "validate" / "key"
    folder.mkdir(parents=True)
    (folder / "half-written").write_text("x")  # an interrupted run's leftovers, no DONE
    with caching.building(folder) as late:
        with caching.building(folder) as early:
            (early / "report.json").write_text("early")
            (late / "report.json").write_text("late")
            assert not caching.is_complete(folder)  # nothing published while both still build
        assert (folder / "report.json").read_text() == "early"
        report = (folder / "report.json").open()  # a run reading the published entry
    # The first to finish published whole; the later one found it complete and left it alone.
    assert caching.is_complete(folder)
    assert report.read() == "early" and (folder / "report.json").read_text() == "early"
    report.close()
    assert not (folder / "half-written").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"]  # no staging left behind


def test_a_failed_build_publishes_nothing(tmp_path: Path):
    folder = tmp_path / "entry"
    with pytest.raises(RuntimeError), caching.building(folder) as staging:
        (staging / "partial").write_text("x")
        raise RuntimeError("interrupted")
    assert not folder.exists() and list(tmp_path.iterdir()) == []


def test_a_result_is_rehomed_from_staging_to_its_entry(tmp_path: Path):
    staging, folder = tmp_path / "k.building-1", tmp_path / "k"
    data = TokenizedData(
        path=str(staging / "tokenized"), rows={"train": 2}, tokens={"train": 9}, mean_tokens={}
    )
    assert caching.rehome(data, staging, folder).path == str(folder / "tokenized")
