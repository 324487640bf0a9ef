#!/usr/bin/env bash
# Stable Diffusion 3 DreamBooth (full fine-tuning, flow matching) on one device. With no --model_name / data set:
# the embedded SD3 digits model on the embedded digits with their captions, ending with the learning check (exit 4
# below 90%); about 5 minutes on 2 CPU cores. Options: --key=value (docs/launching.md).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch dreambooth_sd3 --num_devices=1 "$@"
