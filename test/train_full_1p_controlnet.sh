#!/usr/bin/env bash
# Controlnet on one device; with no --model_name the embedded offline digits model.
# Options: --key=value (docs/launching.md, or python3 -m diffusers_npu.launch --help).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet --num_devices=1 "$@"
