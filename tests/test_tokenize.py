from pathlib import Path

from datasets import Dataset
from transformers import AutoTokenizer

from tasks.config import ModelConfig
from tasks.tokenize import encode

from .conftest import data_config, prepare


def test_encode_truncates_without_padding(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = Dataset.from_dict({"text": ["short", "a much longer sentence " * 20], "label": ["b", "a"]})
    out = encode(ds, tokenizer, ["a", "b"], max_length=16)
    lengths = [len(ids) for ids in out["input_ids"]]
    assert lengths[0] < 16 and lengths[1] == 16  # no padding to max_length
    assert out["labels"] == [1, 0]
    assert set(out.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "text" not in out.column_names


def test_tokenize_saves_every_split(tiny_csv: Path, tiny_model_dir: Path, tmp_path: Path):
    cfg = data_config(tiny_csv, validation_fraction=0.125, test_fraction=0.125)
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir), max_length=8)
    _, splits, result = prepare(cfg, model_cfg, tmp_path)
    assert result.rows == splits.rows
    assert result.truncated_fraction["train"] == 1.0  # every row has more than 8 tokens
    assert 0 < result.mean_tokens["test"] <= 8
