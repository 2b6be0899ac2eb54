#!/usr/bin/env bash
# The GPU check (issue "Speed"): one script, under 8 minutes on one GPU, that prints one table (bench/gpu_check.py
# says what it measures). On the device machine: `bash bench/gpu_check.sh`, with .whl/ carried (made here by
# bench/gpu_wheels.sh). Anywhere else: `bash bench/gpu_check.sh --dry-run` checks it end to end on tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ls .whl/*.whl >/dev/null 2>&1; then
  # The device image's python3 holds CUDA torch; the carried wheels add what it lacks, without touching torch.
  PY=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
out="${OUT:-/tmp}"
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
fi
set -o pipefail
timeout 470 "$PY" bench/gpu_check.py "$@" 2> >(tee "$out/gpu_check.err" >&2) | tee "$out/gpu_check.txt"
