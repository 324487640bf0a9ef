#!/usr/bin/env bash
# One command for the first person with an Ascend machine (and CI on CPU / CUDA):
#     bash test/npu_selfcheck.sh [--device npu|cuda|cpu] [--skip_training] [--steps N] [--workdir DIR] [--nproc N]
# Checks attention, optimizers, clipping, fp16 loss scaling and short training runs on this machine's device
# against float64 references, prints one table, writes test/output/selfcheck.json (or --json PATH), and exits
# 0 only if every check passed. About 1 minute on a 2-core CPU. Same as `diffusers-npu selfcheck`.
# --nproc N adds the multi-process section: DDP / FSDP / DeepSpeed steps on N processes against one process,
# and an all-reduce bandwidth figure.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=test/env_npu.sh
source "$repo/test/env_npu.sh"
mkdir -p "$repo/test/output"
where=(--json "$repo/test/output/selfcheck.json")
for arg in "$@"; do
    case "$arg" in --json|--json=*) where=() ;; esac   # the caller chose where the JSON goes
done
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"   # this clone's code, as the launchers use it
exec "${PYTHON:-python3}" -m diffusers_npu.selfcheck ${where[@]+"${where[@]}"} "$@"
