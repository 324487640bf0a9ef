#!/usr/bin/env bash
# One prepared run on a GPU machine that has only torch (and its image's usual packages) and no network:
#
#   bash bench/gpu_run.sh [WHEEL_DIR]        # WHEEL_DIR (default .whl) made by bench/fetch_wheels.sh
#   bash bench/gpu_run.sh --smoke            # the same sequence on CPU with tiny presets (a minute or two)
#
# 1. Installs the carried wheels into a private folder (no index, no dependency resolution, nothing system-wide).
# 2. SD 2.1-base, 512 px, batch 24, the real Trainer step (bench/train_throughput.py): online (encoders in the
#    step; target >= 80 images/s), compiled (= --cache_latents --compile; target >= 150 images/s), the
#    re-implemented upstream reference, cached. The harness builds the random-weight model folder and the image
#    folder itself (under $WORK) and records each mode's training command.
# 3. Diffusion transformers, one device, bf16, the real Trainer step of the DreamBooth scripts (module
#    diffusers_npu.benchmark.dit; text encoders of the published widths but one layer: the step never runs them,
#    each caption is encoded once during set-up), targets per device from issue #21:
#    a. SD3-medium DreamBooth, full transformer (examples/dreambooth/train_dreambooth_sd3.py), 1024 px, batch 4,
#       --gradient_checkpointing (the task's launch profile): target >= 2.0 images/s;
#    b. SD3-medium DreamBooth-LoRA (train_dreambooth_lora_sd3.py), 1024 px, batch 8: target >= 13.6 images/s;
#    c. FLUX.1-dev full fine-tuning (train_dreambooth_flux.py), 256 px, batch 16, --gradient_checkpointing, at
#       REDUCED DEPTH: all of FLUX.1-dev with AdamW needs ~190 GB (11.9 B parameters x 16 bytes), more than one
#       141 GB device (the 6.9 images/s target is an 8-device FSDP figure); FLUX_DEPTH=10,19 keeps 10 of 19
#       double- and 19 of 38 single-stream blocks at the published widths (6.2 B parameters, ~99 GB). The row
#       measures that model and prints a FLOPs projection of the full depth at the same TFLOP/s (not a
#       measurement). FLUX_LORA=1 adds FLUX.1-dev LoRA at full depth (train_dreambooth_lora_flux.py, same size;
#       its model folder takes 24 GB of $WORK's disk).
# 4. SDXL base architecture, 1024 px: full fine-tune, LoRA and ControlNet steps (issue #12's per-device figures:
#    about 20.6 / 4.0 / 4.1 images/s) -- with the default shares it is left out for lack of time (run it in its
#    own slot: SKIP_SD=1 SKIP_DIT=1).
# JSON + logs go to $OUT (default bench/out); each harness rewrites its JSON after every mode and runs under a
# time limit that keeps the whole script within BUDGET seconds (default 690: a 12-minute slot less start-up).
#
# Knobs: OUT, SITE, WORK, BUDGET, PEAK_TFLOPS (auto for H100/H200/A100), SKIP_SD=1, SKIP_DIT=1, SKIP_SDXL=1,
# SD_BATCH (24), SD_MODES, SD_SHARE (seconds for SD, default 330), DIT_SHARE (seconds for the DiT rows, default
# 330), SD3_BATCH (4), SD3_FLAGS (--gradient_checkpointing), SD3_LORA_BATCH (8), SD3_LORA_FLAGS (none),
# FLUX_BATCH (16), FLUX_DEPTH (10,19; "19,38" = full depth, which needs more than one device), FLUX_FLAGS
# (--gradient_checkpointing), FLUX_LORA=1, SDXL_BATCH (8), SDXL_MODES (online,lora,controlnet), SDXL_FLAGS
# (--gradient_checkpointing), SDXL_MIN (seconds SDXL needs to start, 150), RUN_INFER=1 (also the inference
# benchmark, if time is left), DRY_RUN=1 (print each harness command and its time limit; run nothing). A *_FLAGS
# knob set empty (SD3_FLAGS=) drops its default.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
WHL=${1:-${WHL:-.whl}}
OUT=${OUT:-bench/out}
SITE=${SITE:-/tmp/dnpu-site}
WORK=${WORK:-/tmp/dnpu-bench-work}
BUDGET=${BUDGET:-690}
DRY=${DRY_RUN:-}
mkdir -p "$OUT"
[ -n "$DRY" ] || mkdir -p "$WORK"

if [ -n "$DRY" ]; then  # DRY_RUN=1: print each harness command with its time limit; install and run nothing
    GPU=none
else
if ls "$WHL"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHL"/*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_run.sh: no wheels in $WHL; using the installed packages" >&2
fi
# Without the project's own wheel, run it from this checkout.
ls "$WHL"/diffusers_npu-*.whl >/dev/null 2>&1 || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')")
if [ -z "${PEAK_TFLOPS:-}" ]; then  # dense bf16/fp16 tensor-core peak of the card
    case "$GPU" in
        *H100*PCIe*) PEAK_TFLOPS=756 ;;
        *H100*|*H200*|*H800*) PEAK_TFLOPS=989 ;;
        *A100*|*A800*) PEAK_TFLOPS=312 ;;
    esac
fi
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, torch, diffusers, transformers, accelerate, datasets, diffusers_npu
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__, "| accelerate",
      accelerate.__version__, "| datasets", datasets.__version__, "| diffusers_npu", diffusers_npu.__version__,
      "from", diffusers_npu.__file__)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
fi

SD3_FLAGS=${SD3_FLAGS---gradient_checkpointing}
FLUX_FLAGS=${FLUX_FLAGS---gradient_checkpointing}
SD3_LORA_FLAGS=${SD3_LORA_FLAGS:-}
if [ "$SMOKE" = 1 ]; then  # the same sequence, CPU-sized: proves the script, measures nothing
    SD=(--preset tiny --device cpu --batch_size 2 --steps 2 --warmup 1)
    SD_MODES=${SD_MODES:-online,cached,reference}
    SDXL=(--preset sdxl-tiny --device cpu --batch_size 2 --steps 2 --warmup 1)
    SDXL_FLAGS=${SDXL_FLAGS:-}
    SDXL_MIN=${SDXL_MIN:-30}
    # the DiT rows on diffusers' pipeline-test sizes (the real rows' presets, modes and flags otherwise)
    DIT_COMMON=(--device cpu --steps 2 --warmup 1)
    SD3=(--preset sd3-tiny --batch_size 2)
    SD3_LORA=(--preset sd3-tiny --batch_size 2)
    FLUX=(--preset flux-tiny --batch_size 2)
    FLUX_LORA_ROW=(--preset flux-tiny --batch_size 2)
else
    SD=(--preset sd21-base --resolution 512 --batch_size "${SD_BATCH:-24}" --steps 20 --warmup 5)
    SD_MODES=${SD_MODES:-online,compiled,reference,cached}
    SDXL=(--preset sdxl --resolution 1024 --batch_size "${SDXL_BATCH:-8}" --steps 10 --warmup 3)
    SDXL_FLAGS=${SDXL_FLAGS:---gradient_checkpointing}
    SDXL_MIN=${SDXL_MIN:-150}
    DIT_COMMON=(--mixed_precision bf16 --steps 10 --warmup 3)
    SD3=(--preset sd3-medium --resolution 1024 --batch_size "${SD3_BATCH:-4}")
    SD3_LORA=(--preset sd3-medium --resolution 1024 --batch_size "${SD3_LORA_BATCH:-8}")
    FLUX=(--preset flux1-dev --dit_depth "${FLUX_DEPTH:-10,19}" --resolution 256 --batch_size "${FLUX_BATCH:-16}")
    FLUX_LORA_ROW=(--preset flux1-dev --resolution 256 --batch_size "${FLUX_BATCH:-16}")
fi
PEAK_ARG=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK_ARG=(--peak_tflops "$PEAK_TFLOPS")

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
rc=0
run() {  # run NAME SECONDS ARGS...: one harness run under a time limit, JSON + log in $OUT
    local name=$1 limit=$2; shift 2
    if [ "$limit" -lt 30 ]; then echo "gpu_run.sh: no time left for $name" | tee -a "$OUT/$name.log"; rc=1; return; fi
    echo "== $name ($limit s): python3 bench/train_throughput.py $*" | tee "$OUT/$name.log"
    [ -n "$DRY" ] && return
    timeout --kill-after=10 "$limit" python3 bench/train_throughput.py "$@" --work_dir "$WORK" \
        --json "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
}

SD_SHARE=${SD_SHARE:-330}
if [ -z "${SKIP_SD:-}" ]; then
    run "train_${SD[1]}" "$(( $(left) < SD_SHARE ? $(left) : SD_SHARE ))" "${SD[@]}" --modes "$SD_MODES" \
        "${PEAK_ARG[@]}"
fi

if [ -z "${SKIP_DIT:-}" ]; then
    # Each row may use its weight's part of DIT_SHARE plus what earlier rows left; the later rows' parts stay
    # reserved (a row over its limit is killed: its JSON then has no figure, the later rows still run).
    DIT_SHARE=${DIT_SHARE:-330}
    DIT_END=$(( $(date +%s) + DIT_SHARE ))
    NAMES=("train_${SD3[1]}" "train_${SD3_LORA[1]}_lora" "train_${FLUX[1]}")
    WEIGHTS=(40 25 35)
    if [ -n "${FLUX_LORA:-}" ]; then NAMES+=("train_${FLUX_LORA_ROW[1]}_lora"); WEIGHTS=(30 20 25 25); fi
    dit_limit() {  # dit_limit I: seconds row I may take
        local reserve=0 j now=$(date +%s)
        for (( j = $1 + 1; j < ${#WEIGHTS[@]}; j++ )); do reserve=$(( reserve + WEIGHTS[j] * DIT_SHARE / 100 )); done
        local lim=$(( DIT_END - now - reserve )) l=$(left)
        echo $(( lim < l ? lim : l ))
    }
    run "${NAMES[0]}" "$(dit_limit 0)" "${SD3[@]}" "${DIT_COMMON[@]}" --modes online --extra_flags="$SD3_FLAGS" \
        "${PEAK_ARG[@]}"
    run "${NAMES[1]}" "$(dit_limit 1)" "${SD3_LORA[@]}" "${DIT_COMMON[@]}" --modes lora \
        --extra_flags="$SD3_LORA_FLAGS" "${PEAK_ARG[@]}"
    run "${NAMES[2]}" "$(dit_limit 2)" "${FLUX[@]}" "${DIT_COMMON[@]}" --modes online --extra_flags="$FLUX_FLAGS" \
        "${PEAK_ARG[@]}"
    if [ -n "${FLUX_LORA:-}" ]; then
        run "${NAMES[3]}" "$(dit_limit 3)" "${FLUX_LORA_ROW[@]}" "${DIT_COMMON[@]}" --modes lora "${PEAK_ARG[@]}"
    fi
fi

if [ -z "${SKIP_SDXL:-}" ]; then
    if [ "$(( $(left) - 10 ))" -lt "$SDXL_MIN" ]; then  # not a failure: the shares left it out (see the header)
        echo "gpu_run.sh: SDXL not run: $(left) s of BUDGET left, it needs SDXL_MIN=$SDXL_MIN" \
             "(SKIP_SD=1 SKIP_DIT=1 gives it a slot)" | tee "$OUT/train_${SDXL[1]}.log"
    else
        run "train_${SDXL[1]}" "$(( $(left) - 10 ))" "${SDXL[@]}" --modes "${SDXL_MODES:-online,lora,controlnet}" \
            --extra_flags="$SDXL_FLAGS" "${PEAK_ARG[@]}"
    fi
fi
if [ -n "${RUN_INFER:-}" ] && [ -z "$DRY" ] && [ "$(left)" -gt 60 ]; then
    timeout "$(( $(left) - 5 ))" python3 bench/infer_throughput.py --preset "${SD[1]}" \
        --json "$OUT/infer_${SD[1]}.json" 2>&1 | tee "$OUT/infer_${SD[1]}.log" || rc=1
fi
echo "gpu_run.sh: done in $(( $(date +%s) - START )) s (exit $rc); results in $OUT"
exit $rc
