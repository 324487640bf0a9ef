#!/usr/bin/env bash
# SDXL text-to-image on one device. With no --model_name / data set: the embedded SDXL digits model on the embedded
# digits, ending with the learning check (exit 4 below 90%); about 4 minutes on 2 CPU cores.
# Options: --key=value (docs/launching.md, or python3 -m diffusers_npu.launch --help).
source "$(dirname "$0")/launch_common.sh"
dnpu_launch text_to_image_sdxl --num_devices=1 "$@"
