#!/usr/bin/env bash
# Shared body of every test/*.sh launch script (ModelZoo conventions).
#
# A launch script sets defaults, then calls:   dnpu_main "$@" -- <python script> [fixed training flags...]
# Overrides on the command line, ModelZoo style:  --model_name=PATH --dataset_name=... --local_data_dir=...
#   --batch_size=N --max_train_steps=N --resolution=N --mixed_precision=no|fp16|bf16 --output_dir=DIR
#   --num_devices=N --dry_run=1 (print the launch command and exit)
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR, PORT in the environment.
# Results: test/output/$ASCEND_DEVICE_ID/train_$ASCEND_DEVICE_ID.log and ${CaseName}.log, plus the three
# "Final ..." lines on stdout. Exits non-zero (showing the log's tail) when training fails.
set -uo pipefail

DNPU_TEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DNPU_ROOT="$(cd "$DNPU_TEST_DIR/.." && pwd)"
PYTHON=${PYTHON:-python3}

dnpu_parse_args() {
    local arg key value
    for arg in "$@"; do
        case "$arg" in
            --*=*)
                key="${arg%%=*}"; key="${key#--}"; value="${arg#*=}"
                case "$key" in
                    model_name|dataset_name|local_data_dir|batch_size|max_train_steps|resolution|\
mixed_precision|output_dir|num_devices|dry_run|learning_rate|extra_args)
                        printf -v "$key" '%s' "$value" ;;
                    *) echo "error: unknown option --$key (see the header of test/launch_common.sh)" >&2
                       exit 2 ;;
                esac ;;
            *) echo "error: options are --key=value, got '$arg'" >&2; exit 2 ;;
        esac
    done
}

dnpu_device_count() {
    # Devices of the detected kind on this node (1 on CPU).
    "$PYTHON" - <<'PY' 2>/dev/null || echo 1
from diffusers_npu.device import detect_device
import torch
d = detect_device()
print(torch.npu.device_count() if d == "npu" else torch.cuda.device_count() if d == "cuda" else 1)
PY
}

dnpu_main() {
    local fixed=() seen=0 a
    local opts=()
    for a in "$@"; do
        if [ "$seen" = 0 ] && [ "$a" = "--" ]; then seen=1; continue; fi
        if [ "$seen" = 0 ]; then opts+=("$a"); else fixed+=("$a"); fi
    done
    dnpu_parse_args "${opts[@]+"${opts[@]}"}"
    local script="${fixed[0]}"; fixed=("${fixed[@]:1}")

    # shellcheck disable=SC1091
    source "$DNPU_TEST_DIR/env_npu.sh"
    ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
    NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; PORT=${PORT:-29500}
    local available requested
    available=$(dnpu_device_count)
    requested=${num_devices:-${RankSize:-1}}
    if [ "${dry_run:-0}" = "1" ]; then
        available=$requested   # a dry run plans for the requested devices without needing them
    elif [ "$requested" -gt "$available" ]; then
        echo "Note: ${requested} devices requested, ${available} present on this node; using ${available}."
        requested=$available
    fi
    local nproc=$requested
    WORLD_SIZE=$((nproc * NNODES))
    export WORLD_SIZE
    RankSize=$WORLD_SIZE
    CaseName="${Network}_bs${batch_size}_${WORLD_SIZE}p_acc"
    local out_root="$DNPU_TEST_DIR/output/$ASCEND_DEVICE_ID"
    output_dir=${output_dir:-$out_root/$Network}
    mkdir -p "$out_root"
    local log="$out_root/train_${ASCEND_DEVICE_ID}.log"

    local args=(--train_batch_size="$batch_size" --output_dir="$output_dir" --resume_from_checkpoint=latest
                --disable_progress_bar)
    [ -n "${model_name:-}" ] && args+=(--pretrained_model_name_or_path="$model_name")
    [ -n "${dataset_name:-}" ] && args+=(--dataset_name="$dataset_name")
    [ -n "${local_data_dir:-}" ] && args+=(--local_data_dir="$local_data_dir")
    [ -n "${max_train_steps:-}" ] && args+=(--max_train_steps="$max_train_steps")
    [ -n "${resolution:-}" ] && args+=(--resolution="$resolution")
    [ -n "${mixed_precision:-}" ] && args+=(--mixed_precision="$mixed_precision")
    [ -n "${learning_rate:-}" ] && args+=(--learning_rate="$learning_rate")
    args+=("${fixed[@]+"${fixed[@]}"}")
    # shellcheck disable=SC2206
    [ -n "${extra_args:-}" ] && args+=(${extra_args})

    local device_kind cmd=()
    device_kind=$("$PYTHON" -c 'from diffusers_npu.device import detect_device; print(detect_device())' \
                  2>/dev/null || echo cpu)
    if [ "$WORLD_SIZE" -le 1 ]; then
        cmd=("$PYTHON" "$DNPU_ROOT/$script")
    elif [ "$device_kind" = "cpu" ]; then
        # accelerate launch --cpu --num_processes N silently runs one process; torchrun gives a real group.
        cmd=(env ACCELERATE_USE_CPU=true "$PYTHON" -m torch.distributed.run --nproc_per_node="$nproc"
             --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$PORT"
             "$DNPU_ROOT/$script")
    else
        cmd=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes="$WORLD_SIZE"
             --num_machines="$NNODES" --machine_rank="$NODE_RANK" --main_process_ip="$MASTER_ADDR"
             --main_process_port="$PORT" "$DNPU_ROOT/$script")
    fi
    echo "Network=${Network} devices/node=${nproc} nodes=${NNODES} world=${WORLD_SIZE} device=${device_kind}"
    echo "Launch: ${cmd[*]} ${args[*]}"
    if [ "${dry_run:-0}" = "1" ]; then
        return 0
    fi

    local start end e2e rc
    start=$(date +%s)
    "${cmd[@]}" "${args[@]}" > "$log" 2>&1
    rc=$?
    end=$(date +%s)
    e2e=$((end - start))
    if [ $rc -ne 0 ]; then
        echo "Training failed (exit code $rc). Last lines of $log:" >&2
        tail -n 25 "$log" >&2
        return $rc
    fi
    if grep -q "^Pre-empted" "$log"; then
        echo "Training was pre-empted after saving a checkpoint; rerun the same command to continue."
        return 0
    fi
    local summary="$output_dir/train_summary.json"
    if [ ! -f "$summary" ]; then
        echo "Training ended but wrote no $summary; last lines of $log:" >&2
        tail -n 25 "$log" >&2
        return 1
    fi
    local FPS loss
    read -r FPS loss < <("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); \
print('%.3f %.6f' % (s['images_per_sec'], s['final_loss']))" "$summary")
    local TrainingTime
    TrainingTime=$(awk -v b="$batch_size" -v f="$FPS" 'BEGIN{ if (f>0) printf "%.2f", b*1000/f; else print "nan" }')
    echo "------------------ Final result ------------------"
    echo "Final Performance images/sec : $FPS"
    echo "Final Train Loss : $loss"
    echo "E2E Training Duration sec : $e2e"
    grep "^Learning check" "$log" || true
    local case_log="$out_root/${CaseName}.log"
    {
        echo "Network = ${Network}"
        echo "RankSize = ${RankSize}"
        echo "BatchSize = ${batch_size}"
        echo "DeviceType = ${device_kind}"
        echo "CaseName = ${CaseName}"
        echo "ActualFPS = ${FPS}"
        echo "TrainingTime = ${TrainingTime}"
        echo "ActualLoss = ${loss}"
        echo "E2ETrainingTime = ${e2e}"
    } > "$case_log"
    echo "Summary: $case_log"
}
