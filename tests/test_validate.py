from pathlib import Path

import pandas as pd
import pytest

from tasks.validate import DataValidationError, infer_labels, labels_as_strings

from .conftest import data_config, validate


def test_clean_data_passes_and_is_normalised(tiny_csv: Path, tmp_path: Path):
    data = validate(data_config(tiny_csv), tmp_path / "work")
    assert data.labels == ["negative", "neutral", "positive"]
    frame = pd.read_parquet(data.train_path)
    assert list(frame.columns) == ["text", "label"]
    assert len(frame) == data.rows["train"] == 72
    assert Path(data.report_path).is_file()


def broken(tmp_path: Path, tiny_csv: Path, edit) -> Path:
    frame = pd.read_csv(tiny_csv)
    edit(frame)
    path = tmp_path / "broken.csv"
    frame.to_csv(path, index=False)
    return path


def test_missing_label_column_is_named(tiny_csv: Path, tmp_path: Path):
    path = broken(
        tmp_path, tiny_csv, lambda f: f.rename(columns={"sentiment": "mood"}, inplace=True)
    )
    with pytest.raises(DataValidationError) as err:
        validate(data_config(path), tmp_path / "work")
    message = str(err.value)
    assert "broken.csv" in message
    assert "column 'sentiment'" in message
    assert "required column" in message


def test_empty_text_names_rule_count_and_example(tiny_csv: Path, tmp_path: Path):
    def edit(frame: pd.DataFrame) -> None:
        frame.loc[[3, 9], "review"] = "   "

    path = broken(tmp_path, tiny_csv, edit)
    with pytest.raises(DataValidationError) as err:
        validate(data_config(path), tmp_path / "work")
    message = str(err.value)
    assert "column 'review': text is not empty after stripping" in message
    assert "2 of 72 rows fail" in message
    assert "row 3" in message


def test_labels_outside_the_declared_set(tiny_csv: Path, tmp_path: Path):
    path = broken(
        tmp_path,
        tiny_csv,
        lambda f: f.__setitem__("sentiment", f["sentiment"].replace("neutral", "meh")),
    )
    with pytest.raises(DataValidationError) as err:
        validate(data_config(path, labels=["negative", "neutral", "positive"]), tmp_path / "work")
    rules = {f["rule"]: f for f in err.value.failures}
    assert set(rules) == {
        "label in the declared label set",
        "every declared label occurs in the training data",
    }
    failure = rules["label in the declared label set"]
    assert failure["unexpected_count"] == 24
    assert failure["examples"][0]["value"] == "meh"
    # Nothing is written for training when the data is invalid.
    assert not (tmp_path / "work" / "train.raw.parquet").exists()


def test_text_length_bound(tiny_csv: Path, tmp_path: Path):
    with pytest.raises(DataValidationError, match=r"text length in characters .*\n\s+72 of 72"):
        validate(data_config(tiny_csv, max_chars=5), tmp_path / "work")


def test_test_file_labels_must_fall_in_the_train_label_set(tiny_csv: Path, tmp_path: Path):
    test = broken(tmp_path, tiny_csv, lambda f: f.__setitem__("sentiment", "surprised"))
    with pytest.raises(DataValidationError, match=r"broken\.csv, column 'sentiment'"):
        validate(data_config(tiny_csv, test=str(test)), tmp_path / "work")


def test_label_helpers():
    assert infer_labels(pd.Series(["10", "2", "1", None, ""])) == ["1", "2", "10"]
    assert infer_labels(pd.Series(["b", "a"])) == ["a", "b"]
    assert labels_as_strings(pd.Series([1.0, None, 2.0])).tolist() == ["1", None, "2"]


def test_drop_quarantines_offending_rows_and_revalidates(tiny_csv: Path, tmp_path: Path):
    def edit(frame: pd.DataFrame) -> None:
        frame.loc[[1, 2], "review"] = " "
        frame.loc[5, "review"] = frame.loc[4, "review"]  # a duplicate text

    path = broken(tmp_path, tiny_csv, edit)
    data = validate(data_config(path, on_invalid="drop"), tmp_path / "work")
    assert data.dropped == {
        "text is not empty after stripping": 2,
        "duplicate texts at most data.max_duplicate_rate": 1,
    }
    assert data.rows["train"] == 69
    quarantine = pd.read_csv(data.quarantine_path)
    assert sorted(quarantine["_row"]) == [1, 2, 5]
    assert set(quarantine["_rule"]) == set(data.dropped)


def test_leakage_between_train_and_test(tiny_csv: Path, tmp_path: Path):
    test = tmp_path / "test.csv"
    pd.read_csv(tiny_csv).head(6).to_csv(test, index=False)
    with pytest.raises(DataValidationError, match="leakage") as err:
        validate(data_config(tiny_csv, test=str(test)), tmp_path / "work")
    assert err.value.failures[0]["unexpected_count"] == 6


def test_token_truncation_share_is_reported(tiny_csv: Path, tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = validate(data_config(tiny_csv), tmp_path / "a", tokenizer=tokenizer, max_length=64)
    assert data.truncated_fraction == {"train": 0.0}
    data = validate(
        data_config(tiny_csv, max_truncated_fraction=1.0),
        tmp_path / "b",
        tokenizer=tokenizer,
        max_length=4,
    )
    assert data.truncated_fraction == {"train": 1.0}
    with pytest.raises(DataValidationError, match="truncated"):
        validate(data_config(tiny_csv), tmp_path / "c", tokenizer=tokenizer, max_length=4)
