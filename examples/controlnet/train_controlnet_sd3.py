#!/usr/bin/env python
"""ControlNet for Stable Diffusion 3 / 3.5 (flow matching): train an SD3ControlNetModel that steers the frozen
transformer with a conditioning image.

With no --pretrained_model_name_or_path / data flags it uses the embedded offline SD3 digits model and data
set (conditioning: the Sobel edges of each digit). All logic lives in diffusers_npu.train; run with --help for
every flag (README, Stable Diffusion 3).
"""
import sys

from diffusers_npu.train import main

if __name__ == "__main__":
    sys.exit(main("controlnet_sd3"))
