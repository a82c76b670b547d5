"""The deployment definitions load and validate, without a server or a work pool."""

from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from flows.deploy import deployments
from flows.finetune import finetune
from tasks.config import RunConfig

PREFECT_YAML = Path(__file__).resolve().parent.parent / "infra" / "prefect.yaml"


def test_served_deployments_have_a_schedule_and_a_validated_form():
    nightly, adhoc = deployments(concurrency=2, timezone="Europe/Berlin")
    assert (nightly.name, adhoc.name) == ("nightly", "adhoc")
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.schedule.timezone == "Europe/Berlin"
    assert not adhoc.schedules
    assert nightly.concurrency_limit == adhoc.concurrency_limit == 2
    assert Path(nightly.parameters["config"]["home"]).is_absolute()
    assert deployments()[0].concurrency_limit == 1  # one at a time unless told otherwise
    # The UI's form: the config model with each section, default and description.
    schema = parameter_schema(finetune)  # what the deployment sends to the UI
    config = schema.definitions["RunConfig"]
    assert set(config["properties"]) >= {"data", "model", "train", "eval", "registry", "promote"}
    train = schema.definitions["TrainConfig"]["properties"]
    assert "description" in train["max_train_samples"]
    RunConfig.model_validate(nightly.parameters["config"])


def test_every_field_of_the_run_form_has_a_description():
    schema = parameter_schema(finetune)
    missing = [name for name, spec in schema.properties.items() if not spec.get("description")]
    for model, spec in schema.definitions.items():
        for name, field in spec.get("properties", {}).items():
            # A section (a $ref) is described by its own definition: the model's docstring.
            ref = field.get("$ref", "").rsplit("/", 1)[-1]
            described = field.get("description") or schema.definitions.get(ref, {}).get(
                "description"
            )
            if not described:
                missing.append(f"{model}.{name}")
    assert missing == []


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


@pytest.mark.integration
@pytest.mark.parametrize(
    "ready",
    ["serving on the Prefect API", "polling for scheduled runs"],
    ids=["before-the-runner-starts", "while-polling"],
)
def test_serve_shuts_down_on_sigterm(tmp_path: Path, ready: str):
    """`fulltune serve` as a service manager stops it: SIGTERM, then a clean exit, whether the
    signal lands before prefect's runner has started (it exits on its own) or while it polls."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from flows.local_server import stop_server

    home = tmp_path / "home"
    config = tmp_path / "serve.yaml"
    config.write_text(f"home: {home}\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "fulltune"), "serve", "--config", str(config)],
        env=env | {"PREFECT_HOME": str(tmp_path / "user-prefect")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a bound on a hung start, not a speed assertion
        lines = []
        while not any(ready in line for line in lines):
            line = serve.stdout.readline()
            assert line or serve.poll() is None, "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)
        serve.send_signal(signal.SIGTERM)
        output = serve.communicate(timeout=120)[0]
        assert serve.returncode == 0, output
        assert "stopped serving" in output
    finally:
        if serve.poll() is None:
            serve.kill()
        stop_server(home)
