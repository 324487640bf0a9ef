#!/usr/bin/env bash
# 8 devices, controlnet_flux performance run: 1000 steps of the task's pretrained settings on $FLUX_MODEL (default
# black-forest-labs/FLUX.1-dev) and $DATASET_NAME (default fusing/fill50k); CaseName *_perf
# (src/diffusers_npu/launch/variants.py). Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch controlnet_flux --variant=performance_8p_controlnet_flux "$@"
