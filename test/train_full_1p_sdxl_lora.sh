#!/usr/bin/env bash
# SDXL LoRA on 1 device(s) (UNet attention; --extra_args=--train_text_encoder adds both text encoders). With no
# --model_name: the embedded SDXL digits model; with one: 1024 px, batch 7, fp16. Options: docs/launching.md.
source "$(dirname "$0")/launch_common.sh"
dnpu_launch text_to_image_lora_sdxl --num_devices=1 "$@"
