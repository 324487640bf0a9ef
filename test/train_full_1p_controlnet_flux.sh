#!/usr/bin/env bash
# FLUX.1 ControlNet on 1 device(s), bf16 (the transformer frozen, the ControlNet trained).
# Needs --model_name=<local FLUX.1 folder> and --dataset_name (there is no embedded FLUX model).
# Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_flux --num_devices=1 --mixed_precision=bf16 "$@"
