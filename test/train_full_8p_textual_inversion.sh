#!/usr/bin/env bash
# textual inversion training on 8 devices (as many as this node has, up to 8); embedded offline digits model by default.
# Overrides: --key=value (see launch_common.sh and downstream_train.sh).
exec bash "$(dirname "$0")/downstream_train.sh" textual_inversion 8 "$@"
