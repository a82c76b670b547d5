"""The causal-LM task: packing, perplexity, the gate, and a whole run on a tiny GPT-2."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from tasks.config import DataConfig, ModelConfig, PromoteConfig, load_config
from tasks.kinds import get_kind
from tasks.kinds.causal_lm import CausalLM, collator, mean_loss, pack, perplexity
from tasks.promote import decide
from tasks.results import Evidence
from tasks.sources import read_table, text_documents
from tasks.validate import DataValidationError, validate_data

from .conftest import corpus

encode = CausalLM().encode


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
    assert get_kind("causal-lm").pipeline_task == "text-generation"
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


def lm_evidence(columns, floors: dict[str, float]) -> Evidence:
    return Evidence(
        metric="perplexity",
        columns=columns,
        statistic=mean_loss,
        higher_is_better=False,
        floors={name: math.log(p) for name, p in floors.items()},
        reported=math.exp,
    )


def test_gate_compares_losses_on_the_same_blocks() -> None:
    cfg = PromoteConfig(metric="perplexity", bootstrap_samples=200)
    counts = np.full(50, 10)
    better = (np.full(50, 20.0), counts)  # 2.0 nats per token
    worse = (np.full(50, 25.0), counts)  # 2.5 nats per token
    floors = {"untrained model": 300.0, "unigram": 20.0}
    first = decide(cfg, "1", lm_evidence(better, floors), None, None)
    assert first.promoted and "beats" in first.reason
    assert first.challenger_score == pytest.approx(math.exp(2.0))  # reported as perplexity
    weak = decide(
        cfg, "1", lm_evidence(worse, {"untrained model": 300.0, "unigram": 10.0}), None, None
    )
    assert not weak.promoted and "unigram" in weak.reason
    challenger = decide(cfg, "2", lm_evidence(better, {}), "1", worse)
    assert challenger.promoted
    assert challenger.delta == pytest.approx(0.5)  # nats of mean token loss
    assert challenger.champion_score == pytest.approx(math.exp(2.5))
    assert not decide(cfg, "3", lm_evidence(worse, {}), "2", better).promoted
    blocked = decide(cfg, "3", lm_evidence(better, {}), "2", worse, "another tokenizer")
    assert not blocked.promoted


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
        validate_data(cfg, tmp_path / "v", get_kind("causal-lm"), None, 32)
    message = str(err.value)
    assert "test.jsonl" in message
    assert "no text shared with the training data (leakage)" in message
    assert "3 of 5 rows" in message
    assert "text is not empty after stripping" in message


def test_the_promotion_metric_must_fit_the_task() -> None:
    from tasks.config import ConfigError
    from tasks.preflight import check_gate_metric

    # Unset, the kind decides (its default, or for sft what the data says); a metric of another
    # task is refused before the run starts, naming the ones that fit.
    assert load_config(None, ["task=causal-lm"]).promote.metric is None
    assert check_gate_metric(load_config(None, ["task=causal-lm"])) == []
    with pytest.raises(ConfigError, match="not text-classification"):
        load_config(None, ["eval.general_text=speeches.txt"])
    wrong = load_config(None, ["task=causal-lm", "promote.metric=macro_f1"])
    assert check_gate_metric(wrong) == [
        "promote.metric 'macro_f1' does not fit task 'causal-lm': use perplexity"
    ]
