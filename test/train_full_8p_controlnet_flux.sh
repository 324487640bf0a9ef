#!/usr/bin/env bash
# FLUX.1 ControlNet on 8 device(s), bf16, the ControlNet sharded with --distributed=fsdp by default (the plan
# that fits 8 devices of 64 GB with upstream's default 4 double + 4 single blocks).
# Needs --model_name=<local FLUX.1 folder> and --dataset_name (there is no embedded FLUX model).
# Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_flux --num_devices=8 --mixed_precision=bf16 "$@"
