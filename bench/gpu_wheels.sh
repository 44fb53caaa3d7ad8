#!/usr/bin/env bash
# Download, on a machine with pip, the wheels bench/gpu.sh installs on a GPU machine that has no package index:
# the versions requirements.txt resolves to here (transformers, tokenizers, peft, datasets and what they need that
# a CUDA image with torch may lack), for Python 3.12 on x86-64, into ./.whl (ignored by git).
# Usage (repository root):  bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19 peft==0.21.2 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
ls .whl
