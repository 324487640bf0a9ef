#!/usr/bin/env bash
# Run where PyPI is reachable: puts into one folder (default .whl/) the wheels that a GPU machine with only
# torch and its image's usual packages (transformers, accelerate, huggingface_hub, safetensors, numpy, Pillow,
# regex, requests, pyarrow, pandas, ...) lacks, plus this project's own wheel. bench/gpu_run.sh installs them.
#
#   bash bench/fetch_wheels.sh [DEST]          # PYVER=3.12 by default (the Python of the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYVER=${PYVER:-3.12}
mkdir -p "$DEST"
# Versions the project is tested with (requirements.txt); importlib_metadata 10 needs lazy_importer on Python < 3.15;
# peft serves the LoRA rows (training and their FLOP count).
PKGS=${PKGS:-"diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 importlib_metadata==10.2.0 lazy_importer==0.1.0 peft==0.21.2"}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" $PKGS
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
ls -l "$DEST"
