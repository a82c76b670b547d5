#!/usr/bin/env bash
# GPU benchmark, at most 5 minutes on one H200: BERT-base-sized random-init classifier, seq 128,
# batch 64; samples/s and MFU for fulltune's train task and a bare HF Trainer; then the FSDP test.
#   bash bench/device.sh            (from the project root, on a machine with CUDA)
# Sets the project up first when .venv is missing; on a CUDA machine install a CUDA torch build
# into .venv (TORCH_INDEX=https://download.pytorch.org/whl/cu126 bash bench/device.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  .venv/bin/pip install --quiet -e .
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout 300 .venv/bin/python bench/device.py "$@"
# FSDP (train.fsdp: full_shard) runs only on accelerators: the gpu-marked test trains the tiny
# Llama sharded over every GPU here (it skips with fewer than two).
.venv/bin/pip install --quiet -e ".[dev]"
timeout 300 .venv/bin/pytest -m gpu -q -p no:cacheprovider tests/test_distributed.py
