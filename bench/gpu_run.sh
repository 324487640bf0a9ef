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
# 3. SDXL base architecture, 1024 px: full fine-tune, LoRA and ControlNet steps (issue #12's per-device figures:
#    about 20.6 / 4.0 / 4.1 images/s).
# JSON + logs go to $OUT (default bench/out); each harness rewrites its JSON after every mode and runs under a
# time limit that keeps the whole script within BUDGET seconds (default 690: a 12-minute slot less start-up).
#
# Knobs: OUT, SITE, WORK, BUDGET, PEAK_TFLOPS (auto for H100/H200/A100), SD_BATCH (24), SD_MODES, SD_SHARE
# (seconds for SD, default 330), SDXL_BATCH (8), SDXL_MODES (online,lora,controlnet), SDXL_FLAGS
# (--gradient_checkpointing), SKIP_SDXL=1, RUN_INFER=1 (also the inference benchmark, if time is left).
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
mkdir -p "$OUT" "$WORK"

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

if [ "$SMOKE" = 1 ]; then  # the same sequence, CPU-sized: proves the script, measures nothing
    SD=(--preset tiny --device cpu --batch_size 2 --steps 2 --warmup 1)
    SD_MODES=${SD_MODES:-online,cached,reference}
    SDXL=(--preset sdxl-tiny --device cpu --batch_size 2 --steps 2 --warmup 1)
    SDXL_FLAGS=${SDXL_FLAGS:-}
else
    SD=(--preset sd21-base --resolution 512 --batch_size "${SD_BATCH:-24}" --steps 20 --warmup 5)
    SD_MODES=${SD_MODES:-online,compiled,reference,cached}
    SDXL=(--preset sdxl --resolution 1024 --batch_size "${SDXL_BATCH:-8}" --steps 10 --warmup 3)
    SDXL_FLAGS=${SDXL_FLAGS:---gradient_checkpointing}
fi
PEAK_ARG=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK_ARG=(--peak_tflops "$PEAK_TFLOPS")

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
rc=0
run() {  # run NAME SECONDS ARGS...: one harness run under a time limit, JSON + log in $OUT
    local name=$1 limit=$2; shift 2
    if [ "$limit" -lt 30 ]; then echo "gpu_run.sh: no time left for $name" | tee -a "$OUT/$name.log"; rc=1; return; fi
    echo "== $name ($limit s): python3 bench/train_throughput.py $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$limit" python3 bench/train_throughput.py "$@" --work_dir "$WORK" \
        --json "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
}

SD_SHARE=${SD_SHARE:-330}
run "train_${SD[1]}" "$(( $(left) < SD_SHARE ? $(left) : SD_SHARE ))" "${SD[@]}" --modes "$SD_MODES" "${PEAK_ARG[@]}"
if [ -z "${SKIP_SDXL:-}" ]; then
    run "train_${SDXL[1]}" "$(( $(left) - 10 ))" "${SDXL[@]}" --modes "${SDXL_MODES:-online,lora,controlnet}" \
        --extra_flags="$SDXL_FLAGS" "${PEAK_ARG[@]}"
fi
if [ -n "${RUN_INFER:-}" ] && [ "$(left)" -gt 60 ]; then
    timeout "$(( $(left) - 5 ))" python3 bench/infer_throughput.py --preset "${SD[1]}" \
        --json "$OUT/infer_${SD[1]}.json" 2>&1 | tee "$OUT/infer_${SD[1]}.log" || rc=1
fi
echo "gpu_run.sh: done in $(( $(date +%s) - START )) s (exit $rc); results in $OUT"
exit $rc
