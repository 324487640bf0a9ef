#!/usr/bin/env bash
# FLUX.1 DreamBooth-LoRA on 1 device(s), bf16.
# Needs --model_name=<local FLUX.1 folder> and --instance_data_dir (there is no embedded FLUX model).
# Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch dreambooth_lora_flux --num_devices=1 --mixed_precision=bf16 "$@"
