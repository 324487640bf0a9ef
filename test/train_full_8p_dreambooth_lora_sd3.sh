#!/usr/bin/env bash
# Stable Diffusion 3 DreamBooth-LoRA on 8 device(s) on DDP, bf16. With --model_name: 1024 px, batch 8 per device.
# Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch dreambooth_lora_sd3 --num_devices=8 --mixed_precision=bf16 "$@"
