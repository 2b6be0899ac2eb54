#!/usr/bin/env bash
# Run HERE (not on the device) before bench/gpu_check.sh: downloads, into .whl/, the Python 3.12 wheels the device
# image lacks (its python3 has torch, accelerate, tokenizers, safetensors, numpy; not pydantic, bitsandbytes,
# liger-kernel, and an older transformers), at the versions this project's venv pins. About 59 MiB: the device
# tool carries at most 64 MiB with the working tree, so nothing else goes in. Then:
#   device run:  carry [".whl"], command "bash bench/gpu_check.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=(
  "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic_core)" "annotated-types==$(ver annotated-types)"
  "typing-inspection==$(ver typing-inspection)" "bitsandbytes==$(ver bitsandbytes)"
  "transformers==$(ver transformers)" "peft==$(ver peft)" "liger-kernel" "pyyaml==$(ver pyyaml)"
)
mkdir -p .whl
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
done
du -sh .whl
