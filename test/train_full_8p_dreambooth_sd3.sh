#!/usr/bin/env bash
# Stable Diffusion 3 DreamBooth (full fine-tuning) on 8 device(s), bf16, sharded with --distributed=fsdp by default
# (each transformer block one FSDP unit). With --model_name: SD3-medium settings (1024 px, batch 4 per device,
# gradient checkpointing). Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch dreambooth_sd3 --num_devices=8 --mixed_precision=bf16 "$@"
