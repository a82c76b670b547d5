"""The deployment definitions load and validate, without a server or a work pool."""

from pathlib import Path

import yaml
from prefect.utilities.callables import parameter_schema

from flows.deploy import deployments
from flows.finetune import finetune
from tasks.config import RunConfig

PREFECT_YAML = Path(__file__).resolve().parent.parent / "infra" / "prefect.yaml"


def test_served_deployments_have_a_schedule_and_a_validated_form():
    nightly, adhoc = deployments()
    assert (nightly.name, adhoc.name) == ("nightly", "adhoc")
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert not adhoc.schedules
    # The UI's form: the config model with each section, default and description.
    schema = parameter_schema(finetune)  # what the deployment sends to the UI
    config = schema.definitions["RunConfig"]
    assert set(config["properties"]) >= {"data", "model", "train", "eval", "registry", "promote"}
    train = schema.definitions["TrainConfig"]["properties"]
    assert "description" in train["max_train_samples"]
    RunConfig.model_validate(nightly.parameters["config"])


def test_prefect_yaml_deployments_validate():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert set(names) == {"nightly", "adhoc"}
    assert names["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    for deployment in names.values():
        module, _, attr = deployment["entrypoint"].partition(":")
        assert module == "flows/finetune.py" and attr == "finetune"
        # Whatever parameters a deployment sets must validate as the flow's config.
        RunConfig.model_validate(deployment["parameters"].get("config", {}))
    assert finetune.name == "finetune"
