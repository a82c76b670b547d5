#!/usr/bin/env bash
# Serve the Prefect UI and the MLflow UI on the local stores that `fulltune run` writes to.
#   Prefect: http://127.0.0.1:${PREFECT_PORT:-4200}   MLflow: http://127.0.0.1:${MLFLOW_PORT:-5000}
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
home=${FULLTUNE_HOME:-.fulltune}
prefect_port=${PREFECT_PORT:-4200}
mlflow_port=${MLFLOW_PORT:-5000}

# The Prefect UI calls its API on port 4200 unless told otherwise.
export PREFECT_UI_API_URL="http://127.0.0.1:${prefect_port}/api"
# mlflow spawns worker processes: a process group per server lets Ctrl-C stop them all.
setsid "$bin/prefect" server start --host 127.0.0.1 --port "$prefect_port" &
prefect_pid=$!
setsid "$bin/mlflow" ui --host 127.0.0.1 --port "$mlflow_port" \
  --backend-store-uri "sqlite:///${home}/mlflow.db" &
mlflow_pid=$!
trap 'kill -- -"$prefect_pid" -"$mlflow_pid" 2>/dev/null || true' EXIT INT TERM
echo "Prefect UI: http://127.0.0.1:${prefect_port}   MLflow UI: http://127.0.0.1:${mlflow_port}"
wait
