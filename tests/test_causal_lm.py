"""The causal-LM task: packing, perplexity, the gate, and a whole run on a tiny GPT-2."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from tasks.config import DataConfig, ModelConfig, PromoteConfig, load_config
from tasks.kinds import get_kind
from tasks.kinds.causal_lm import collator, decide, encode, pack, perplexity
from tasks.sources import read_table, text_documents
from tasks.validate import DataValidationError, validate_data

SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a child"]
VERBS = ["sat on", "ran to", "looked at", "walked past", "jumped over", "sang near"]
OBJECTS = ["the mat", "the house", "a tree", "the river", "a car", "the garden"]
ENDINGS = ["today", "again", "slowly", "at night"]


def corpus(n: int = 160, seed: int = 0) -> list[str]:
    """Distinct sentences from a small grammar: a language a tiny model can learn quickly."""
    sentences = [" ".join(p) for p in itertools.product(SUBJECTS, VERBS, OBJECTS, ENDINGS)]
    return random.Random(seed).sample(sentences, n)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 GPT-2 with a byte-level BPE tokenizer trained here on the corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus(), vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pack_keeps_every_token_exactly_once() -> None:
    documents = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    blocks = pack(documents, 4)
    assert [len(b) for b in blocks] == [4, 4, 3]
    assert list(itertools.chain.from_iterable(blocks)) == list(range(1, 12))


def test_encode_packs_documents_with_eos_between(tiny_gpt2_dir: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    texts = corpus(20)
    packed = encode(Dataset.from_dict({"text": texts}), tokenizer, [], ModelConfig(max_length=16))
    stream = list(itertools.chain.from_iterable(packed["input_ids"]))
    eos = tokenizer.eos_token_id
    expected = []
    for text in texts:
        expected += [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    assert stream == expected  # nothing lost, nothing repeated, EOS after every document
    assert all(n == 16 for n in packed["length"][:-1]) and packed["length"][-1] <= 16
    assert packed["labels"] == packed["input_ids"]
    assert stream.count(eos) == len(texts)


def test_unpacked_examples_mask_padding_out_of_the_loss(tiny_gpt2_dir: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    data = encode(
        Dataset.from_dict({"text": ["the cat sat on the mat", "a bird"]}),
        tokenizer,
        [],
        ModelConfig(max_length=32, packing=False),
    )
    batch = collator(tokenizer)([{k: row[k] for k in ("input_ids", "labels")} for row in data])
    short = data["length"][1]
    assert batch["labels"][1, short:].eq(-100).all()
    assert batch["labels"][1, short - 1] == tokenizer.eos_token_id  # EOS is learnt, not masked
    assert batch["attention_mask"][1, short:].eq(0).all()


def test_a_tied_lm_head_counts_in_the_flops(tiny_gpt2_dir: Path) -> None:
    from tasks.efficiency import embedding_params, non_embedding_params
    from tasks.kinds.causal_lm import setup_model

    model = setup_model(ModelConfig(name_or_path=str(tiny_gpt2_dir)), [])
    total = sum(p.numel() for p in model.parameters())
    vocab_table = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is vocab_table  # tied, listed once
    assert non_embedding_params(model) == total - embedding_params(model) + vocab_table.numel()


def test_perplexity_is_over_tokens_not_batches() -> None:
    # Two blocks: 1 token at loss 4.0 and 3 tokens at loss 0.0 each.
    scores = perplexity(np.array([4.0, 0.0]), np.array([1, 3]))
    assert scores["loss"] == pytest.approx(1.0)  # per-block mean of means would say 2.0
    assert scores["perplexity"] == pytest.approx(math.e)
    assert scores["tokens"] == 4


def test_gate_compares_losses_on_the_same_blocks() -> None:
    cfg = PromoteConfig(metric="perplexity", bootstrap_samples=200)
    counts = np.full(50, 10)
    better = (np.full(50, 20.0), counts)  # 2.0 nats per token
    worse = (np.full(50, 25.0), counts)  # 2.5 nats per token
    first = decide(cfg, "1", better, {"untrained model": 300.0, "unigram": 20.0}, None, None)
    assert first.promoted and "beats" in first.reason
    weak = decide(cfg, "1", worse, {"untrained model": 300.0, "unigram": 10.0}, None, None)
    assert not weak.promoted and "unigram" in weak.reason
    challenger = decide(cfg, "2", better, {}, "1", worse)
    assert challenger.promoted
    assert challenger.delta == pytest.approx(0.5)
    assert challenger.champion_score == pytest.approx(math.exp(2.5))
    assert not decide(cfg, "3", worse, {}, "2", better).promoted
    assert not decide(cfg, "3", better, {}, "2", worse, "another tokenizer").promoted


def test_text_files_split_into_documents(tmp_path: Path) -> None:
    text = "first line\nsecond line\n\n\nthird paragraph\nstill third\n"
    assert text_documents(text, "line") == [
        "first line",
        "second line",
        "third paragraph",
        "still third",
    ]
    assert text_documents(text, "paragraph") == [
        "first line\nsecond line",
        "third paragraph\nstill third",
    ]
    path = tmp_path / "docs.txt"
    path.write_text(text)
    assert read_table(str(path), documents="paragraph").frame["text"].tolist()[1] == (
        "third paragraph\nstill third"
    )


def test_lm_contract_catches_leakage_and_empty_documents(tmp_path: Path) -> None:
    import pandas as pd

    train, test = tmp_path / "train.txt", tmp_path / "test.jsonl"
    lines = corpus(40)
    train.write_text("\n".join(lines))
    pd.DataFrame({"text": [*lines[:3], "a new sentence", "   "]}).to_json(
        test, orient="records", lines=True
    )
    cfg = DataConfig(train=str(train), test=str(test))
    with pytest.raises(DataValidationError) as err:
        validate_data(cfg, tmp_path / "v", "causal-lm")
    message = str(err.value)
    assert "test.jsonl" in message
    assert "no text shared with the training data (leakage)" in message
    assert "3 of 5 rows" in message
    assert "text is not empty after stripping" in message


def test_config_ties_the_promotion_metric_to_the_task() -> None:
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match="perplexity"):
        load_config(None, ["task=causal-lm"])


def lm_overrides(tiny_gpt2_dir: Path, tmp_path: Path) -> list[str]:
    """A causal-LM run on the tiny GPT-2 and the generated sentences, in seconds."""
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(corpus(160)) + "\n")
    return [
        "task=causal-lm",
        "promote.metric=perplexity",
        f"home={tmp_path / 'home'}",
        f"model.name_or_path={tiny_gpt2_dir}",
        "model.max_length=32",
        f"data.train={data}",
        "data.validation_fraction=0.125",
        "data.test_fraction=0.125",
        "train.batch_size=8",
        "train.learning_rate=0.01",
        "train.warmup_fraction=0.0",
        "train.logging_steps=5",
        "train.early_stopping_patience=null",
        "eval.prompts=['the cat']",
        "eval.max_new_tokens=8",
        "registry.model_name=tiny-lm",
    ]


def test_lm_sweep_minimises_validation_loss(
    tiny_gpt2_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    from flows.sweep import sweep

    cfg = load_config(None, [*lm_overrides(tiny_gpt2_dir, tmp_path), "train.max_steps=12"])
    summary = sweep(config=cfg, trials=2)
    assert summary.metric == "loss"
    completed = [t for t in summary.trials if not t.pruned]
    assert summary.best_value == min(t.value for t in completed)
    assert summary.final.metrics["perplexity"] < summary.final.baseline["perplexity"]


def test_causal_lm_run_lowers_perplexity_and_registers_a_generator(
    tiny_gpt2_dir: Path, tmp_path: Path, prefect_harness: None
) -> None:
    from flows.finetune import finetune

    cfg = load_config(None, [*lm_overrides(tiny_gpt2_dir, tmp_path), "train.max_steps=60"])
    summary = finetune(config=cfg)

    # The fine-tuned model predicts held-out tokens far better than where it started.
    assert summary.metrics["perplexity"] < 0.5 * summary.baseline["perplexity"]
    assert "untrained model" in summary.table and "perplexity" in summary.table
    client = MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(summary.mlflow_run_id)
    metrics = run.data.metrics
    assert metrics["train/tensors_updated_fraction"] == 1.0  # every weight was trained
    assert metrics["train/tokens_seen"] > 0
    assert metrics["data/tokens_train"] > metrics["data/examples_train"]
    assert metrics["test/perplexity"] == pytest.approx(summary.metrics["perplexity"])
    assert run.data.tags["fulltune.task"] == "causal-lm"
    artifacts = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "evaluation")}
    assert "evaluation/generations.json" in artifacts

    version = client.get_model_version("tiny-lm", summary.model.version)
    assert float(version.tags["test.perplexity"]) == pytest.approx(
        summary.metrics["perplexity"], rel=1e-3
    )
    mlflow.set_tracking_uri(cfg.tracking_uri())
    mlflow.set_registry_uri(cfg.tracking_uri())
    generator = mlflow.pyfunc.load_model(f"models:/tiny-lm/{summary.model.version}")
    generated = generator.predict(["the cat"])
    assert isinstance(generated[0], str) and len(generated[0]) > len("the cat")
    assert get_kind("causal-lm").pipeline_task == "text-generation"
    from typer.testing import CliRunner

    from flows.cli import app

    uri = cfg.tracking_uri()
    result = CliRunner().invoke(
        app, ["predict", "-m", "models:/tiny-lm/1", "-t", "the cat", "--tracking-uri", uri]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("the cat")
    assert summary.decision is not None and summary.decision.metric == "perplexity"

    # The same config again: the champion is compared on the same blocks, its losses read back.
    again = finetune(config=cfg)
    assert again.decision is not None and again.decision.champion_before == "1"
    assert again.decision.delta == pytest.approx(0.0, abs=1e-6)  # same seed, same model
    assert not again.decision.promoted and "lower by" in again.decision.reason


def test_lm_training_resumes_from_its_checkpoint(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Resume is the shared recipe's: an LM run picks up from its latest complete checkpoint."""
    from tasks.config import TrainConfig
    from tasks.split import split_data
    from tasks.tokenize import tokenize
    from tasks.train import latest_checkpoint, train

    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(corpus(160)) + "\n")
    cfg = DataConfig(train=str(data), validation_fraction=0.125, test_fraction=0.125)
    model_cfg = ModelConfig(name_or_path=str(tiny_gpt2_dir), max_length=32)
    validated = validate_data(cfg, tmp_path / "v", "causal-lm")
    splits = split_data(validated, cfg, tmp_path)
    tokenized = tokenize(splits, [], model_cfg, tmp_path, get_kind("causal-lm"))
    checkpoints = tmp_path / "checkpoints"

    def run(max_steps: int, folder: str):
        train_cfg = TrainConfig(
            max_steps=max_steps,
            batch_size=8,
            learning_rate=0.01,
            checkpoint_steps=5,
            select_best=False,
            early_stopping_patience=None,
        )
        return train(
            tokenized,
            [],
            model_cfg,
            train_cfg,
            tmp_path / folder,
            checkpoint_dir=checkpoints,
            kind=get_kind("causal-lm"),
        )

    first = run(10, "first")
    assert first.resumed_from_step is None
    assert latest_checkpoint(checkpoints) is not None
    assert latest_checkpoint(checkpoints).name == "checkpoint-10"
    resumed = run(15, "second")
    assert resumed.resumed_from_step == 10
    assert resumed.global_step == 15  # 5 more steps, not 15 from scratch
