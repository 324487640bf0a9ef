#!/usr/bin/env bash
# 8 devices, sd2-1, fp32, performance run. Overrides: --key=value (see launch_common.sh).
exec bash "$(dirname "$0")/text_to_image_8p.sh" sd2-1 fp32 performance "$@"
