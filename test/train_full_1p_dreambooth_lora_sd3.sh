#!/usr/bin/env bash
# Stable Diffusion 3 DreamBooth-LoRA on one device (transformer LoRA; --extra_args=--train_text_encoder adds both
# CLIP encoders). With no --model_name: the embedded SD3 digits model, prior preservation, 200 steps.
# Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch dreambooth_lora_sd3 --num_devices=1 "$@"
