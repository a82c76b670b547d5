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
# FSDP (train.fsdp: full_shard) over the GPUs, NCCL: the 2-rank test on CUDA needs two of them
# (the default tier runs it on CPU processes over gloo).
.venv/bin/pip install --quiet -e ".[dev]"
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  timeout 300 .venv/bin/pytest -q -p no:cacheprovider tests/test_distributed.py -k fsdp
else
  echo "one GPU: the FSDP test needs two ranks on two GPUs; skipped"
fi
