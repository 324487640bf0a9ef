#!/usr/bin/env bash
# Text-to-image fine-tuning on one device. With no --model_name / data set: the README's main job, the embedded
# offline digits model on the embedded digits, ending with the learning check (exit 4 below 90%).
# Options: --key=value (docs/launching.md, or python3 -m diffusers_npu.launch --help).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch text_to_image --num_devices=1 "$@"
