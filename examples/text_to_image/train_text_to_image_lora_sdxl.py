#!/usr/bin/env python
"""LoRA for Stable Diffusion XL text-to-image (UNet attention; both text encoders with --train_text_encoder).
Writes pytorch_lora_weights.safetensors for StableDiffusionXLPipeline.load_lora_weights.

With no --pretrained_model_name_or_path / --dataset_name it uses the embedded offline SDXL digits model and
data set. All logic lives in diffusers_npu.train; run with --help for every flag (README, Stable Diffusion XL).
"""
import sys

from diffusers_npu.train import main
from diffusers_npu.train.tasks.text_to_image_sdxl import TextToImageLoraSDXLTask

if __name__ == "__main__":
    sys.exit(main(TextToImageLoraSDXLTask))
