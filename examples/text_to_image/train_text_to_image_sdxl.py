#!/usr/bin/env python
"""Fine-tune a Stable Diffusion XL UNet (or LoRA adapters with --use_lora) on (image, caption) pairs, with both
text encoders, the pooled text embedding and per-sample micro-conditioning time ids from the real crop.

With no --pretrained_model_name_or_path / --dataset_name it trains the embedded offline SDXL digits model on
the embedded digits; its tuned settings are examples/text_to_image/configs/embedded_digits_sdxl.yaml
(--config). All logic lives in diffusers_npu.train; run with --help for every flag (README, Stable Diffusion XL).
"""
import sys

from diffusers_npu.train import main
from diffusers_npu.train.tasks.text_to_image_sdxl import TextToImageSDXLTask

if __name__ == "__main__":
    sys.exit(main(TextToImageSDXLTask))
