#!/usr/bin/env bash
# Ascend runtime environment used by the launch scripts and test/npu_selfcheck.sh. Safe to source on CPU/GPU
# machines: CANN's set_env.sh is sourced only when found, the variables below are ignored without an NPU, and
# the NPU check at the end stays silent where torch_npu is not installed.

# CANN's set_env.sh. Where CANN is depends on who installed it: a root install records its prefix in
# /etc/Ascend/ascend_cann_install.info ("Install_Path=<prefix>", the line ModelZoo's own env_npu.sh reads),
# a user install goes to ~/Ascend; the full toolkit has ascend-toolkit/set_env.sh, newer releases
# cann/set_env.sh, and the runtime-only package (NNAE) nnae/set_env.sh.
_dnpu_source_cann() {
    local info=${DIFFUSERS_NPU_CANN_INFO:-/etc/Ascend/ascend_cann_install.info} prefix candidate
    local prefixes=()
    if [ -r "$info" ]; then
        prefix=$(sed -n 's/^[[:space:]]*Install_Path[[:space:]]*=[[:space:]]*//p' "$info" | head -n 1 | tr -d "\"'\r")
        [ -n "$prefix" ] && prefixes+=("${prefix%/}")
    fi
    prefixes+=(/usr/local/Ascend "${HOME:-/root}/Ascend")
    local candidates=()
    [ -n "${ASCEND_TOOLKIT_HOME:-}" ] && candidates+=("$ASCEND_TOOLKIT_HOME/set_env.sh" "$ASCEND_TOOLKIT_HOME/../set_env.sh")
    for prefix in "${prefixes[@]}"; do
        candidates+=("$prefix/ascend-toolkit/set_env.sh" "$prefix/cann/set_env.sh" "$prefix/nnae/set_env.sh")
    done
    for candidate in "${candidates[@]}"; do
        if [ -f "$candidate" ]; then
            # CANN's set_env.sh expands $LD_LIBRARY_PATH, $PYTHONPATH, ... unguarded: under the caller's
            # `set -u` (npu_selfcheck.sh, launchers) an unset one would abort the shell. Sourced with -u off,
            # and the caller's setting restored.
            local had_u=0
            case $- in *u*) had_u=1 ;; esac
            set +u
            # shellcheck disable=SC1090
            source "$candidate"
            [ "$had_u" = 1 ] && set -u
            export DIFFUSERS_NPU_CANN_ENV="$candidate"   # which one was used, for the logs
            return 0
        fi
    done
    return 1
}
_dnpu_source_cann || true
unset -f _dnpu_source_cann

# Defaults only: a value the user exported is kept. No HCCL_IF_IP: HCCL picks its network interface itself
# (HCCL_SOCKET_IFNAME / HCCL_IF_IP are the user's to set), and a guessed address would hang the link set-up
# for HCCL_CONNECT_TIMEOUT seconds when wrong.
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}   # host log to stdout off
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}           # error level only
export ASCEND_GLOBAL_EVENT_ENABLE=${ASCEND_GLOBAL_EVENT_ENABLE:-0}     # event log off
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}   # operator dispatch queue (2 is faster, more memory)
export HCCL_WHITELIST_DISABLE=${HCCL_WHITELIST_DISABLE:-1}             # no communication IP whitelist
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-5400}              # link set-up timeout, seconds (ModelZoo)
export INF_NAN_MODE_ENABLE=${INF_NAN_MODE_ENABLE:-1}   # IEEE inf/nan instead of saturation (Atlas A2 on)
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}       # core binding in current torch_npu
# The caching allocator's expandable segments (less fragmentation with large models), as Ascend's own
# suites set it (torch_npu docs: PYTORCH_NPU_ALLOC_CONF.md).
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}

# torch_npu installed but no usable NPU (CANN not found, driver not loaded, no device in the container):
# training would quietly fall back to the CPU. Say so loudly, with the reason. Skipped when the user chose
# the CPU (DIFFUSERS_NPU_DEVICE=cpu) and where torch_npu is not installed (a quick lookup, no import).
_dnpu_python=${PYTHON:-python3}
if [ "${DIFFUSERS_NPU_DEVICE:-}" != "cpu" ] && command -v "$_dnpu_python" >/dev/null 2>&1 \
   && "$_dnpu_python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch_npu') is None)" 2>/dev/null; then
    # This clone's diffusers_npu, as the launchers use it (BASH_SOURCE: this file, wherever it is sourced from).
    _dnpu_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/src"
    _dnpu_status=$(PYTHONPATH="$_dnpu_src${PYTHONPATH:+:$PYTHONPATH}" "$_dnpu_python" -c "from diffusers_npu.device import npu_status
usable, why = npu_status()
print(('ok: ' if usable else 'no: ') + why)" 2>&1 | tail -n 1)
    case "$_dnpu_status" in
        "ok: "*) echo "env_npu.sh: ${_dnpu_status#ok: }${DIFFUSERS_NPU_CANN_ENV:+ (CANN: $DIFFUSERS_NPU_CANN_ENV)}" >&2 ;;
        *) {
            echo "=================================================================================="
            echo "WARNING: torch_npu is installed, but no Ascend NPU is usable here:"
            echo "  ${_dnpu_status#no: }"
            echo "  CANN environment: ${DIFFUSERS_NPU_CANN_ENV:-none found (looked in /etc/Ascend/ascend_cann_install.info, /usr/local/Ascend, ~/Ascend)}"
            echo "Training would run on the CPU. Fix the above, or set DIFFUSERS_NPU_DEVICE=cpu to use the CPU on purpose."
            echo "=================================================================================="
           } >&2 ;;
    esac
    unset _dnpu_status _dnpu_src
fi
unset _dnpu_python
