#!/usr/bin/env bash
# usage: text_to_image_8p.sh <sd1-5|sd2-1> <fp32|fp16|fp16_fa> <full|performance> [--key=value ...]
# Kept for old command lines; the eight settings live in src/diffusers_npu/launch/variants.py.
source "$(dirname "$0")/launch_common.sh"
if [ $# -lt 3 ]; then
    echo "error: usage: text_to_image_8p.sh <sd1-5|sd2-1> <fp32|fp16|fp16_fa> <full|performance> [--key=value ...]" >&2
    exit 2
fi
dnpu_launch text_to_image --variant="${3}_8p_text_to_image_${1}_${2}" "${@:4}"
