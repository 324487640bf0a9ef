#!/usr/bin/env bash
# SDXL full fine-tuning on 8 device(s), bf16. With no --model_name: the embedded SDXL digits model; with one:
# Ascend's SDXL suite settings (1024 px, batch 24, gradient checkpointing); several devices default to
# --distributed=fsdp (parameters, gradients and optimizer state sharded). Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch text_to_image_sdxl --num_devices=8 --mixed_precision=bf16 "$@"
