#!/usr/bin/env bash
# 8 devices, sd1-5, fp32, full run. Overrides: --key=value (see launch_common.sh).
exec bash "$(dirname "$0")/text_to_image_8p.sh" sd1-5 fp32 full "$@"
