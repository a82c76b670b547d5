from pathlib import Path

import pytest

from tasks.config import DEFAULT_CONFIG, ConfigError, RunConfig, load_config, parse_override

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


def test_default_config_is_the_demo():
    assert load_config() == load_config(DEFAULT_CONFIG)


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
    cfg = load_config()
    flat = cfg.flat()
    assert flat["train.batch_size"] == str(cfg.train.batch_size)
    assert flat["data.labels"] == '["negative", "neutral", "positive"]'
    assert cfg.digest() == load_config().digest()
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
