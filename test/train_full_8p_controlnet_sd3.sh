#!/usr/bin/env bash
# Stable Diffusion 3 ControlNet on 8 device(s) on DDP, bf16 (the transformer frozen, the ControlNet trained).
# Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_sd3 --num_devices=8 --mixed_precision=bf16 "$@"
