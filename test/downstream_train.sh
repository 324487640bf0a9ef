#!/usr/bin/env bash
# usage: downstream_train.sh <dreambooth|textual_inversion|controlnet> <num_devices> [--key=value ...]
# Kept for old command lines; the train_full_{1,8}p_<task>.sh scripts call the launcher directly.
source "$(dirname "$0")/launch_common.sh"
if [ $# -lt 2 ]; then
    echo "error: usage: downstream_train.sh <dreambooth|textual_inversion|controlnet> <num_devices> [--key=value ...]" >&2
    exit 2
fi
dnpu_launch "$1" --num_devices="$2" "${@:3}"
