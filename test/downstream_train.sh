#!/usr/bin/env bash
# One body for the DreamBooth, textual-inversion and ControlNet launch scripts (1 and 8 devices).
# usage: downstream_train.sh <dreambooth|textual_inversion|controlnet> <num_devices> [--key=value ...]
# With no --model_name it trains the embedded offline digits model (CPU: a few minutes); with one, the
# upstream examples' hyper-parameters at 512 px (pass the task's data flags via --extra_args="...").
# Overrides and outputs: see the header of launch_common.sh.
source "$(dirname "$0")/launch_common.sh"
task=${1:-}; num_devices=${2:-}; shift 2 || true
dnpu_parse_args "$@"
embedded=1
[ -n "${model_name:-}" ] && embedded=0
fixed=(--lr_scheduler=constant --lr_warmup_steps=0)
case "$task" in
    dreambooth)
        Network="StableDiffusion_dreambooth"
        script=examples/dreambooth/train_dreambooth.py
        fixed+=(--with_prior_preservation --prior_loss_weight=1.0 --checkpointing_steps=200)
        if [ "$embedded" = 1 ]; then
            batch_size=${batch_size:-4}; max_train_steps=${max_train_steps:-400}; learning_rate=${learning_rate:-5e-5}
            fixed+=(--num_class_images=50 --class_inference_steps=20)
        else
            resolution=${resolution:-512}; batch_size=${batch_size:-1}; max_train_steps=${max_train_steps:-800}
            learning_rate=${learning_rate:-5e-6}
            fixed+=(--num_class_images=200 --instance_prompt="a photo of sks dog" --class_prompt="a photo of dog")
        fi ;;
    textual_inversion)
        Network="StableDiffusion_textual_inversion"
        script=examples/textual_inversion/textual_inversion.py
        fixed+=(--checkpointing_steps=500)
        if [ "$embedded" = 1 ]; then
            batch_size=${batch_size:-8}; max_train_steps=${max_train_steps:-500}; learning_rate=${learning_rate:-5e-3}
        else
            resolution=${resolution:-512}; batch_size=${batch_size:-1}; max_train_steps=${max_train_steps:-3000}
            learning_rate=${learning_rate:-5e-4}
            fixed+=(--gradient_accumulation_steps=4 --scale_lr --placeholder_token="<cat-toy>"
                    --initializer_token=toy)
        fi ;;
    controlnet)
        Network="StableDiffusion_controlnet"
        script=examples/controlnet/train_controlnet.py
        fixed+=(--checkpointing_steps=500)
        if [ "$embedded" = 1 ]; then
            batch_size=${batch_size:-16}; max_train_steps=${max_train_steps:-500}; learning_rate=${learning_rate:-1e-4}
        else
            resolution=${resolution:-512}; batch_size=${batch_size:-4}; max_train_steps=${max_train_steps:-5000}
            learning_rate=${learning_rate:-1e-5}
            fixed+=(--dataloader_num_workers=4)
        fi ;;
    *) echo "error: unknown task '$task' (expected dreambooth, textual_inversion or controlnet)" >&2; exit 2 ;;
esac
case "$num_devices" in
    ''|*[!0-9]*) echo "error: the number of devices must be a whole number, got '$num_devices'" >&2; exit 2 ;;
esac
dnpu_main "$@" -- "$script" "${fixed[@]}"
