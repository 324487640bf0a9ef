#!/usr/bin/env bash
# 8 devices, controlnet_sd3 performance run: 1000 steps of the task's pretrained settings on $SD3_MODEL (default
# stabilityai/stable-diffusion-3-medium-diffusers) and $INSTANCE_DIR or $DATASET_NAME; CaseName *_perf
# (src/diffusers_npu/launch/variants.py). Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_sd3 --variant=performance_8p_controlnet_sd3 "$@"
