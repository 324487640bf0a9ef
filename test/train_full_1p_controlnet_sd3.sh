#!/usr/bin/env bash
# Stable Diffusion 3 ControlNet on one device. With no --model_name: the embedded SD3 digits model, conditioning
# the Sobel edges of each digit. Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_sd3 --num_devices=1 "$@"
