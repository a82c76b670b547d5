"""An SFT run end to end on the tiny Llama: contract, answer-only training, generation-based
evaluation against the zero-shot model, the chat registry, predict and the gate."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import load_config

from .conftest import colour_rows, invoke, registered_weights, served_model, tiny_overrides

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def sft_run(tiny_llama_dir: Path, tmp_path_factory, prefect_harness):
    from flows.finetune import finetune

    work = tmp_path_factory.mktemp("sft")
    data = work / "colours.csv"
    colour_rows(160).to_csv(data, index=False)
    cfg = load_config(
        None,
        [*tiny_overrides(tiny_llama_dir, data, work / "home", task="sft"), "train.max_steps=80"],
    )
    return cfg, finetune(config=cfg)


def test_the_model_learns_to_answer_and_beats_zero_shot(sft_run):
    _, summary = sft_run
    assert summary.metrics["exact_match"] > summary.baseline["exact_match"] + 0.3
    assert summary.metrics["accuracy"] >= 0.8  # three colours: a closed set, judged as labels
    assert summary.metrics["outside_label_set"] < summary.baseline["outside_label_set"] + 1e-9
    # Loss on the answers only fell far below where the pretrained (random) model started.
    assert summary.metrics["answer_loss"] < 0.5 * summary.baseline["answer_loss"]
    assert summary.decision is not None and summary.decision.promoted
    assert "zero-shot model" in summary.decision.reason


def test_run_records_every_weight_trained_and_the_answers(sft_run):
    cfg, summary = sft_run
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["train/tensors_updated_fraction"] == 1.0
    assert run.data.tags["fulltune.task"] == "sft"
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "evaluation")}
    assert {"evaluation/test_answers.json", "evaluation/answers_table.json"} <= artifacts


def test_registered_chat_model_answers_through_pyfunc_and_predict(sft_run):
    cfg, summary = sft_run
    uri = cfg.tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/tiny-chat/{summary.model.version}")
    messages = [{"role": "user", "content": "colour of the sky please now 7?"}]
    reply = model.predict({"messages": messages})
    content = reply[0]["choices"][0]["message"]["content"]
    assert content.strip() == "blue"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "predict",
            "-m",
            "models:/tiny-chat@champion",
            "-t",
            "colour of the sky?",
            "--tracking-uri",
            uri,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].endswith("blue")


def test_a_second_identical_run_is_compared_with_the_champion(sft_run, tiny_llama_dir):
    from flows.finetune import finetune

    cfg, summary = sft_run
    again = finetune(config=cfg)
    assert again.decision is not None and again.decision.champion_before == summary.model.version
    assert again.decision.delta == pytest.approx(0.0, abs=1e-9)
    assert not again.decision.promoted


def test_the_model_learned_to_stop_after_its_answer(sft_run, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary = sft_run
    model_dir, tokenizer_dir = registered_weights(
        cfg.tracking_uri(), summary.model.model_uri, tmp_path
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "colour of the grass please now 3?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert tokenizer.eos_token_id in out.tolist()  # it ends its answer well before the cap
    answer = out.tolist()[: out.tolist().index(tokenizer.eos_token_id)]
    assert tokenizer.decode(answer).strip() == "green"


@pytest.mark.integration
def test_mlflow_models_serve_answers_a_chat_request(sft_run):
    cfg, summary = sft_run
    uri = f"models:/tiny-chat/{summary.model.version}"
    with served_model(uri, cfg.tracking_uri()) as port:
        reply = invoke(port, {"messages": [{"role": "user", "content": "colour of the sea?"}]})
    choices = reply[0]["choices"] if isinstance(reply, list) else reply["choices"]
    assert choices[0]["message"]["role"] == "assistant"
    assert choices[0]["message"]["content"].strip() == "blue"


def test_compare_shows_two_sft_versions_on_the_same_rows(sft_run):
    cfg, _ = sft_run  # versions 1 and 2: the module's run and the identical one above
    result = CliRunner().invoke(
        app,
        [
            "compare",
            "models:/tiny-chat/1",
            "models:/tiny-chat/2",
            "--tracking-uri",
            cfg.tracking_uri(),
        ],
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "the same for both" in out and "| answer_loss |" in out and "| accuracy |" in out
    assert "B - A on accuracy: +0.0000" in out  # the gate's metric over this closed set
    assert "the rows that changed most" in out
    wrong = CliRunner().invoke(
        app,
        [
            "compare",
            "models:/tiny-chat/1",
            "models:/tiny-chat/2",
            "--metric",
            "perplexity",
            "--tracking-uri",
            cfg.tracking_uri(),
        ],
    )
    assert wrong.exit_code != 0 and "does not fit these versions" in wrong.output
