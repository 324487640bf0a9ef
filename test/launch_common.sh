#!/usr/bin/env bash
# Shared by every test/*.sh launch script: the Ascend environment (env_npu.sh), then the Python launcher,
#   dnpu_launch TASK [launcher options] "$@"
# which is `python3 -m diffusers_npu.launch` writing its logs to test/output/$ASCEND_DEVICE_ID/.
# Options are ModelZoo-style --key=value (--model_name, --dataset_name, --batch_size, --max_train_steps,
# --num_devices, --dry_run=1, --extra_args="...", ...): see docs/launching.md or
# `python3 -m diffusers_npu.launch --help`. Several nodes: NNODES, NODE_RANK, MASTER_ADDR, PORT.
DNPU_TEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DNPU_ROOT="$(cd "$DNPU_TEST_DIR/.." && pwd)"
# shellcheck disable=SC1091
source "$DNPU_TEST_DIR/env_npu.sh"

dnpu_launch() {
    # This clone's code, even where another copy of diffusers_npu is installed.
    export PYTHONPATH="$DNPU_ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    exec "${PYTHON:-python3}" -m diffusers_npu.launch --log_dir="$DNPU_TEST_DIR/output/${ASCEND_DEVICE_ID:-0}" "$@"
}
