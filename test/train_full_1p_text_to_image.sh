#!/usr/bin/env bash
# Text-to-image fine-tuning on one device. With no --model_name/--dataset_name it trains the embedded offline
# digits model on the embedded digits data set (CPU: about 15 minutes) and reports the learning check.
source "$(dirname "$0")/launch_common.sh"
Network="StableDiffusion_text_to_image"
num_devices=1
dnpu_parse_args "$@"
fixed=()
if [ -z "${model_name:-}" ] && [ -z "${dataset_name:-}" ] && [ -z "${local_data_dir:-}" ]; then
    # The embedded default: hyper-parameters live in one reviewed config file.
    batch_size=${batch_size:-64}
    fixed+=(--config="$DNPU_ROOT/examples/text_to_image/configs/embedded_digits.yaml")
else
    resolution=${resolution:-512}; max_train_steps=${max_train_steps:-15000}; batch_size=${batch_size:-1}
    fixed+=(--center_crop --random_flip --lr_scheduler=constant --lr_warmup_steps=0 --learning_rate=1e-05
            --checkpointing_steps=5000 --dataloader_num_workers=4)
fi
dnpu_main "$@" -- examples/text_to_image/train_text_to_image.py "${fixed[@]}"
