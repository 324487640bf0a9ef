#!/usr/bin/env bash
# Textual inversion on one device; with no --model_name the embedded offline digits model.
# Options: --key=value (docs/launching.md, or python3 -m diffusers_npu.launch --help).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch textual_inversion --num_devices=1 "$@"
