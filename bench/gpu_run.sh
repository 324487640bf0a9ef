#!/usr/bin/env bash
# One command on a GPU machine that has only torch (and its image's usual packages) installed and no network:
#
#   bash bench/gpu_run.sh [WHEEL_DIR]        # WHEEL_DIR (default .whl) made by bench/fetch_wheels.sh
#
# Installs the carried wheels into a private folder (no index, no dependency resolution, nothing system-wide),
# then runs both benchmarks on SD2.1-base at 512 px (training: batch 24, all four modes; inference: 50 steps,
# batch 1 and 4, plain vs ours) and writes JSON + logs to $OUT (default bench/out). Each benchmark writes its JSON
# after every mode, so a time limit still leaves the figures measured so far.
#
# Environment knobs: OUT, SITE (install folder), PRESET (sd21-base), BATCH (24), PEAK_TFLOPS (auto for
# H100/H200/A100), TRAIN_TIMEOUT / INFER_TIMEOUT (seconds, default 330 / 240), COMPILE_MODE (inference,
# default max-autotune), RUN_768=1 (also sd21 at 768 px, cached + compiled), SKIP_INFER=1, SKIP_TRAIN=1.
set -uo pipefail
cd "$(dirname "$0")/.."
WHL=${1:-${WHL:-.whl}}
OUT=${OUT:-bench/out}
SITE=${SITE:-/tmp/dnpu-site}
PRESET=${PRESET:-sd21-base}
BATCH=${BATCH:-24}
mkdir -p "$OUT"

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
import platform, torch, diffusers, transformers, diffusers_npu
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__,
      "| diffusers_npu", diffusers_npu.__version__, "from", diffusers_npu.__file__)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
PEAK_ARG=${PEAK_TFLOPS:+--peak_tflops $PEAK_TFLOPS}
rc=0
if [ -z "${SKIP_TRAIN:-}" ]; then
    timeout "${TRAIN_TIMEOUT:-330}" python3 bench/train_throughput.py --preset "$PRESET" --batch_size "$BATCH" \
        $PEAK_ARG --json "$OUT/train_${PRESET}.json" 2>&1 | tee "$OUT/train_${PRESET}.log" || rc=1
fi
if [ -n "${RUN_768:-}" ]; then
    timeout "${TRAIN_TIMEOUT:-330}" python3 bench/train_throughput.py --preset sd21 --resolution 768 \
        --batch_size "$BATCH" --modes cached,compiled $PEAK_ARG --json "$OUT/train_sd21_768.json" 2>&1 \
        | tee "$OUT/train_sd21_768.log" || rc=1
fi
if [ -z "${SKIP_INFER:-}" ]; then
    timeout "${INFER_TIMEOUT:-240}" python3 bench/infer_throughput.py --preset "$PRESET" \
        --compile_mode "${COMPILE_MODE:-max-autotune}" --json "$OUT/infer_${PRESET}.json" 2>&1 \
        | tee "$OUT/infer_${PRESET}.log" || rc=1
fi
exit $rc
