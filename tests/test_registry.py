"""Champion/challenger, lineage, predict, reproduce and serve, on tiny models in one store."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.finetune import finetune
from tasks.config import load_config

from .conftest import LABELS, invoke, make_rows, served_model, tiny_overrides

pytestmark = pytest.mark.flow

MODEL = "tiny-sentiment"


@pytest.fixture(scope="module")
def store(prefect_harness, tiny_model_dir, tmp_path_factory):
    """Three runs in one store: v1, v2 on the same test split, v3 on another split."""
    home = tmp_path_factory.mktemp("registry")
    data = home / "reviews.csv"
    make_rows(90).to_csv(data, index=False)
    overrides = tiny_overrides(tiny_model_dir, data, home)
    cfg = load_config(None, overrides)
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    first = finetune(config=cfg)
    if not first.decision.promoted:  # the tiny model may lose to TF-IDF: promote by hand
        client.set_registered_model_alias(MODEL, "champion", first.model.version)
    second = finetune(config=cfg)
    third = finetune(config=load_config(None, [*overrides, "data.split_seed=7"]))
    return cfg, client, data, (first, second, third)


def cli(store, *args: str):
    cfg = store[0]
    return CliRunner().invoke(app, [*args, "--tracking-uri", cfg.tracking_uri()])


def test_each_version_records_a_decision_and_lineage(store):
    _, client, _, runs = store
    for summary in runs:
        tags = client.get_model_version(MODEL, summary.model.version).tags
        assert tags["promotion.decision"] in {"promoted", "kept"}
        assert tags["promotion.reason"] == summary.decision.reason
        for key in (
            "mlflow_run_id",
            "prefect_flow_run_id",
            "data_fingerprint",
            "validation",
            "config_hash",
            "git_commit",
        ):
            assert tags[f"lineage.{key}"], key


def test_first_model_is_judged_against_both_baselines(store):
    first = store[3][0]
    assert first.decision.champion_before is None
    assert first.decision.reason.startswith("first model: macro_f1")
    # On these toy rows TF-IDF is perfect, so the tiny model can't pass; the reason says so.
    assert "TF-IDF + logistic regression" in first.decision.reason
    assert first.decision.promoted == (
        first.decision.challenger_score
        > max(first.classical["macro_f1"], first.baseline["macro_f1"])
    )


def test_challenger_is_compared_on_the_same_rows_with_a_confidence_interval(store):
    _, client, _, (first, second, _) = store
    decision = second.decision
    assert decision.champion_before == first.model.version
    assert decision.reevaluated_champion is False  # same test fingerprint: logged predictions
    assert decision.ci_low is not None and decision.ci_low <= decision.delta <= decision.ci_high
    assert "95% CI" in decision.reason
    champion = client.get_model_version_by_alias(MODEL, "champion")
    expected = second.model.version if decision.promoted else first.model.version
    assert str(champion.version) == expected


def test_champion_is_rescored_when_the_test_split_changed(store):
    third = store[3][2]
    assert third.decision.champion_before is not None
    assert third.decision.reevaluated_champion is True


def test_lineage_prints_the_chain(store):
    result = cli(store, "lineage", f"models:/{MODEL}@champion")
    assert result.exit_code == 0, result.output
    for key in (
        "mlflow run",
        "lineage.prefect_flow_run_id",
        "lineage.data_fingerprint",
        "lineage.git_commit",
        "lineage.config_hash",
        "lineage.validation",
        "promotion.decision",
    ):
        assert key in result.output


def test_compare_two_versions_on_the_same_rows(store):
    _, _, _, (first, second, third) = store
    name = first.model.name
    result = cli(store, "compare", first.model.model_uri, second.mlflow_run_id)  # a URI, a run
    assert result.exit_code == 0, result.output
    assert f"| macro_f1 | {first.metrics['macro_f1']:.4f} | {second.metrics['macro_f1']:.4f}" in (
        result.output
    )
    assert "paired bootstrap 95% CI" in result.output
    if "where they disagree" in result.output:
        assert "truth " in result.output and "'" in result.output  # the row's text is shown
    # The third version was scored on another test split: not comparable row by row.
    other = cli(store, "compare", first.model.model_uri, third.model.model_uri)
    assert other.exit_code == 1 and "different test rows" in other.output
    assert name


def test_promote_by_hand_and_roll_back(store):
    _, client, _, runs = store
    name = runs[0].model.name
    before = str(client.get_model_version_by_alias(name, "champion").version)
    target = next(r.model.version for r in runs if r.model.version != before)
    result = cli(store, "promote", f"models:/{name}/{target}", "--reason", "rollback")
    assert result.exit_code == 0, result.output
    assert f"@champion -> {name} v{target} (was v{before})" in result.output
    moved = client.get_model_version(name, target)
    assert str(client.get_model_version_by_alias(name, "champion").version) == target
    assert moved.tags["manual.champion.reason"] == "rollback"
    assert moved.tags["manual.champion.previous"] == str(before)
    assert "fulltune promote" in moved.tags["manual.champion.by"]
    back = cli(store, "promote", f"models:/{name}/{before}", "--reason", "undo")
    assert back.exit_code == 0, back.output
    assert str(client.get_model_version_by_alias(name, "champion").version) == before

    # Promoting the version that holds the alias changes nothing, and writes nothing.
    tags = client.get_model_version(name, before).tags
    again = cli(store, "promote", f"models:/{name}/{before}", "--reason", "twice")
    assert (
        again.exit_code == 0 and "already on" in again.output and "nothing changed" in again.output
    )
    assert client.get_model_version(name, before).tags == tags
    # A bad alias is one line, not a traceback.
    bad = cli(store, "promote", f"models:/{name}/{before}", "--to", "bad alias!")
    assert bad.exit_code == 1 and "--to 'bad alias!'" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1


def test_promote_refuses_a_version_whose_run_did_not_finish(store):
    _, client, _, (first, _, _) = store
    name = first.model.name
    unfinished = client.create_run(client.get_experiment_by_name("fulltune").experiment_id)
    source = client.get_model_version(name, first.model.version).source
    version = client.create_model_version(name, source, run_id=unfinished.info.run_id).version
    client.set_terminated(unfinished.info.run_id, "FAILED")
    result = cli(store, "promote", f"models:/{name}/{version}")
    assert result.exit_code == 1
    assert "is FAILED, not FINISHED" in result.output
    assert str(client.get_model_version_by_alias(name, "champion").version) != str(version)


def test_predict_text_and_files(store, tmp_path: Path):
    result = cli(
        store,
        "predict",
        "--model",
        f"models:/{MODEL}@champion",
        "--text",
        "great love",
        "--text",
        "awful broken",
    )
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [row[0] in LABELS for row in lines] == [True, True]

    src, out = tmp_path / "in.csv", tmp_path / "out.jsonl"
    pd.DataFrame({"body": ["happy best day", "worst terrible", "blue table"]}).to_csv(
        src, index=False
    )
    result = cli(
        store,
        "predict",
        "-m",
        f"models:/{MODEL}@champion",
        "-i",
        str(src),
        "-o",
        str(out),
        "--text-column",
        "body",
        "--batch-size",
        "2",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["body"] for r in rows] == ["happy best day", "worst terrible", "blue table"]
    assert all(r["label"] in LABELS and 0 <= r["score"] <= 1 for r in rows)


def test_predict_bad_input_is_explained(store, tmp_path: Path):
    src = tmp_path / "in.csv"
    pd.DataFrame({"body": ["x"]}).to_csv(src, index=False)
    missing = cli(store, "predict", "-m", f"models:/{MODEL}@champion", "-i", str(src))
    assert missing.exit_code == 1 and "no column 'text'" in missing.output
    (tmp_path / "empty.csv").write_text("")
    empty = cli(
        store, "predict", "-m", f"models:/{MODEL}@champion", "-i", str(tmp_path / "empty.csv")
    )
    assert empty.exit_code == 1 and "empty" in empty.output
    alias = cli(store, "predict", "-m", f"models:/{MODEL}@nope", "--text", "hi")
    assert (
        alias.exit_code == 1 and f"models:/{MODEL}@nope: no such registered model" in alias.output
    )


def tampered_copy(store, tmp_path: Path, marker: Path) -> str:
    """A new version whose MLmodel makes pyfunc import a module shipped in its artifacts."""
    import shutil

    import yaml
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    _, client, _, (first, _, _) = store
    source = ModelsArtifactRepository.get_underlying_uri(f"models:/{MODEL}/{first.model.version}")
    copy = tmp_path / "tampered"
    shutil.copytree(source.removeprefix("file://"), copy)
    (copy / "code").mkdir()
    (copy / "code" / "payload.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def _load_pyfunc(path):\n    raise RuntimeError('payload loaded')\n"
    )
    spec = yaml.safe_load((copy / "MLmodel").read_text())
    spec["flavors"]["python_function"] |= {"loader_module": "payload", "code": "code"}
    (copy / "MLmodel").write_text(yaml.safe_dump(spec))
    version = client.create_model_version(MODEL, str(copy), run_id=first.mlflow_run_id)
    return str(version.version)


def test_predict_runs_no_code_from_the_registry_unless_asked(store, tmp_path: Path):
    marker = tmp_path / "payload-ran"
    version = tampered_copy(store, tmp_path, marker)
    safe = cli(store, "predict", "-m", f"models:/{MODEL}/{version}", "-t", "great love")
    assert safe.exit_code == 0, safe.output
    assert safe.stdout.split("\t")[0] in LABELS and not marker.exists(), "weights only"
    opted = cli(store, "predict", "-m", f"models:/{MODEL}/{version}", "-t", "hi", "--pyfunc")
    assert marker.exists(), "--pyfunc imports what the version ships: the documented boundary"
    assert opted.exit_code == 1 and "payload loaded" in opted.output
    assert "Traceback" not in opted.output


def test_predict_on_a_version_whose_artifacts_are_gone_says_so_in_one_line(store, tmp_path):
    _, client, _, (first, _, _) = store
    gone = client.create_model_version(
        MODEL, str(tmp_path / "deleted-artifacts"), run_id=first.mlflow_run_id
    )
    result = cli(store, "predict", "-m", f"models:/{MODEL}/{gone.version}", "-t", "hi")
    assert result.exit_code == 1
    assert "its artifacts are gone" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_reproduce_refuses_when_the_data_changed(store):
    _cfg, _, data, (first, _, _) = store
    original = data.read_bytes()
    try:
        make_rows(90, seed=3).to_csv(data, index=False)
        result = cli(store, "reproduce", first.mlflow_run_id)
    finally:
        data.write_bytes(original)
    assert result.exit_code == 1
    assert "data fingerprint changed" in result.output and "--force" in result.output


@pytest.mark.integration
def test_mlflow_models_serve_answers_invocations(store):
    cfg = store[0]
    with served_model(f"models:/{MODEL}@champion", cfg.tracking_uri()) as port:
        reply = invoke(port, {"inputs": ["love this wonderful day", "awful broken mess"]})
    predictions = reply["predictions"]
    assert len(predictions) == 2
    assert {p["label"] for p in predictions} <= set(LABELS)
