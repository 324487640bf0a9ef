#!/usr/bin/env bash
# Ascend runtime environment used by the ModelZoo launch scripts. Safe to source on CPU/GPU machines:
# CANN's set_env.sh is sourced only when present, and the variables below are ignored without an NPU.
for cann_env in "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh" \
                /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$cann_env" ]; then
        # shellcheck disable=SC1090
        source "$cann_env"
        break
    fi
done
export ASCEND_SLOG_PRINT_TO_STDOUT=0   # host log to stdout off
export ASCEND_GLOBAL_LOG_LEVEL=3       # error level only
export ASCEND_GLOBAL_EVENT_ENABLE=0    # event log off
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}   # operator dispatch queue (2 is faster, more memory)
export COMBINED_ENABLE=1               # optimise non-contiguous op combinations
export HCCL_WHITELIST_DISABLE=1        # no communication IP whitelist
export HCCL_CONNECT_TIMEOUT=5400       # link set-up timeout, seconds
export INF_NAN_MODE_ENABLE=1           # IEEE inf/nan instead of saturation (Atlas A2 only)
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}   # core binding in current torch_npu
if [ -z "${HCCL_IF_IP:-}" ]; then
    HCCL_IF_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
    export HCCL_IF_IP
fi
