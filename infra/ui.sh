#!/usr/bin/env bash
# The Prefect UI and the MLflow UI on the stores that `fulltune run` writes to.
#   Prefect: the home's own server (the one every run uses; started here if none runs)
#   MLflow:  http://127.0.0.1:${MLFLOW_PORT:-5000}
# Ctrl-C stops the MLflow UI; the Prefect server keeps serving runs (`fulltune server stop`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
home=${FULLTUNE_HOME:-.fulltune}
mlflow_port=${MLFLOW_PORT:-5000}

"$bin/fulltune" server start --home "$home"
# mlflow spawns worker processes: a process group lets Ctrl-C stop them all.
setsid "$bin/mlflow" ui --host 127.0.0.1 --port "$mlflow_port" \
  --backend-store-uri "sqlite:///${home}/mlflow.db" &
mlflow_pid=$!
trap 'kill -- -"$mlflow_pid" 2>/dev/null || true' EXIT INT TERM
echo "MLflow UI: http://127.0.0.1:${mlflow_port}/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=fulltune"
wait
