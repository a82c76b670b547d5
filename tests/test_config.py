from pathlib import Path

import pytest

from tasks.config import (
    DEMO_CONFIG,
    ConfigError,
    RunConfig,
    load_config,
    parse_duration,
    parse_override,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "imdb-bert.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # Each config says how to run it.
    assert path.read_text().lstrip().startswith("#")
    assert "fulltune run" in path.read_text().split("\n\n")[0] or "make demo" in path.read_text()


def test_built_in_defaults_are_not_the_demo_and_size_themselves():
    built_in, demo = load_config(), load_config(DEMO_CONFIG)
    assert built_in == RunConfig() and built_in != demo
    assert built_in.data.train is None  # no data is assumed: the preflight asks for it
    assert (built_in.train.epochs, built_in.train.learning_rate) == ("auto", "auto")
    assert (built_in.model.max_length, built_in.model.truncation) == ("auto", "auto")
    assert built_in.train.warmup_fraction == "auto" and built_in.train.memory == "auto"
    # The demo keeps its explicit, tuned values.
    assert demo.model.max_length == 64 and demo.train.epochs != "auto"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("10m", 600), ("1h30m", 5400), ("45", 45), ("1.5h", 5400)]
)
def test_time_budgets_read_as_people_write_them(text: str, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10 minutes", "m", "-5", "0s"])
def test_a_time_budget_that_is_not_a_duration_is_refused(text: str):
    with pytest.raises(ConfigError, match=r"train\.time_budget"):
        load_config(None, [f"train.time_budget={text!r}"])


def test_dotted_overrides_reach_every_documented_key(tmp_path: Path):
    cfg = load_config(
        None,
        [
            "task=text-classification",
            "model.name_or_path=bert-base-uncased",
            "data.train=a.csv",
            "data.test=b.csv",
            "data.text_column=review",
            "data.label_column=stars",
            "train.epochs=2",
            "train.max_steps=7",
            "train.batch_size=4",
            "train.learning_rate=3e-5",
            "train.max_train_samples=100",
            "train.seed=7",
            "registry.model_name=my-model",
        ],
    )
    assert cfg.model.name_or_path == "bert-base-uncased"
    assert (cfg.data.train, cfg.data.test) == ("a.csv", "b.csv")
    assert (cfg.data.text_column, cfg.data.label_column) == ("review", "stars")
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.batch_size) == (2, 7, 4)
    assert cfg.train.learning_rate == 3e-5
    assert (cfg.train.max_train_samples, cfg.train.seed) == (100, 7)
    assert cfg.registry.model_name == "my-model"


def test_override_value_is_parsed_as_yaml():
    assert parse_override("data.labels=[neg, pos]") == (["data", "labels"], ["neg", "pos"])
    assert parse_override("train.max_train_samples=") == (["train", "max_train_samples"], None)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.learning_rate=-1", "train.learning_rate"),
        ("train.epochs=many", "train.epochs"),
        ("train.epoch=2", "train.epoch"),
        ("data.labels=[a]", "data"),
        ("task=summarization", "task"),
    ],
)
def test_invalid_values_fail_naming_the_field(override: str, names: str):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_mlflow_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    cfg = load_config(None, [f"home={tmp_path}"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"


def test_flat_params_and_digest_are_stable():
    cfg = load_config(DEMO_CONFIG)
    flat = cfg.flat()
    assert flat["train.batch_size"] == str(cfg.train.batch_size)
    assert flat["data.labels"] == '["negative", "neutral", "positive"]'
    assert cfg.digest() == load_config(DEMO_CONFIG).digest()
    assert cfg.digest() != load_config(None, ["train.seed=1"]).digest()


def test_configuration_doc_is_generated_from_the_models():
    """docs/configuration.md is `make docs` output: a changed field must be regenerated."""
    from tasks.config import reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text(encoding="utf-8") == reference_markdown(), "run `make docs`"


def test_every_field_has_a_description():
    """Descriptions feed the generated doc and the Prefect run form: none may be missing."""
    from pydantic import BaseModel

    missing = []
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            missing += [
                f"{section}.{k}" for k, f in model.model_fields.items() if not f.description
            ]
        elif not field.description:
            missing.append(section)
    assert not missing
