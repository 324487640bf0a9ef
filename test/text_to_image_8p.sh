#!/usr/bin/env bash
# One body for the eight 8-device text-to-image scripts of the original README.
# usage: text_to_image_8p.sh <sd1-5|sd2-1> <fp32|fp16|fp16_fa> <full|performance> [--key=value ...]
# Uses as many devices as this node has (up to 8) and says so; NNODES/NODE_RANK/MASTER_ADDR/PORT for more nodes.
source "$(dirname "$0")/launch_common.sh"
sd=$1; prec=$2; kind=$3; shift 3
case "$sd" in
    sd1-5) model_name=${SD15_MODEL:-runwayml/stable-diffusion-v1-5}; resolution=512 ;;
    sd2-1) model_name=${SD21_MODEL:-stabilityai/stable-diffusion-2-1}; resolution=768 ;;
    *) echo "error: unknown model family '$sd' (expected sd1-5 or sd2-1)" >&2; exit 2 ;;
esac
dataset_name=${DATASET_NAME:-lambdalabs/pokemon-blip-captions}
Network="StableDiffusion_${sd}_text_to_image_${prec}"
num_devices=8
batch_size=4
mixed_precision=fp16
fixed=(--center_crop --random_flip --lr_scheduler=constant --lr_warmup_steps=0 --learning_rate=1e-05
       --max_grad_norm=1 --dataloader_num_workers=8 --enable_pin_memory --enable_persistent_workers)
case "$prec" in
    fp32) mixed_precision=no; fixed+=(--attention=upcast) ;;
    fp16) fixed+=(--attention=upcast) ;;
    fp16_fa) batch_size=24; fixed+=(--enable_npu_flash_attention --gradient_checkpointing --use_ema) ;;
    *) echo "error: unknown precision '$prec' (expected fp32, fp16 or fp16_fa)" >&2; exit 2 ;;
esac
case "$kind" in
    full) max_train_steps=15000; fixed+=(--checkpointing_steps=5000) ;;
    performance) max_train_steps=1000; fixed+=(--checkpointing_steps=100000 --report_to=none) ;;
    *) echo "error: unknown run kind '$kind' (expected full or performance)" >&2; exit 2 ;;
esac
dnpu_main "$@" -- examples/text_to_image/train_text_to_image.py "${fixed[@]}"
