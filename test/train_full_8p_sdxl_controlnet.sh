#!/usr/bin/env bash
# SDXL ControlNet on 8 device(s). With no --model_name: the embedded SDXL digits model (derived conditioning);
# with one: 1024 px, batch 5, fp16. Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_sdxl --num_devices=8 "$@"
