#!/usr/bin/env python
"""Train a ControlNet next to a frozen Stable Diffusion XL UNet; writes a ControlNetModel folder for
StableDiffusionXLControlNetPipeline.

With no --pretrained_model_name_or_path / data flags it uses the embedded offline SDXL digits model and data
set (conditioning: Sobel edges of each digit). All logic lives in diffusers_npu.train; run with --help for
every flag (README, Stable Diffusion XL).
"""
import sys

from diffusers_npu.train import main
from diffusers_npu.train.tasks.controlnet_sdxl import ControlNetSDXLTask

if __name__ == "__main__":
    sys.exit(main(ControlNetSDXLTask))
