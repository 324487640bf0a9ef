#!/usr/bin/env bash
# 8 devices, text-to-image sd1-5_fp32, full run (settings: src/diffusers_npu/launch/variants.py).
# Options: --key=value (docs/launching.md, or python3 -m diffusers_npu.launch --help).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch text_to_image --variant=full_8p_text_to_image_sd1-5_fp32 "$@"
