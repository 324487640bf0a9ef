#!/usr/bin/env bash
# controlnet training on one device; embedded offline digits model by default.
# Overrides: --key=value (see launch_common.sh and downstream_train.sh).
exec bash "$(dirname "$0")/downstream_train.sh" controlnet 1 "$@"
