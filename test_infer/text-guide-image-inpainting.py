#!/usr/bin/env python
"""Text-guided inpainting inference (StableDiffusionInpaintPipeline; StableDiffusionXLInpaintPipeline for
SDXL folders). --lora loads LoRA weights.

Flags instead of code edits: run with --help. Same as `diffusers-npu generate inpainting ...`;
all logic lives in diffusers_npu.inference.
"""
import os
import sys

try:
    from diffusers_npu.inference import main
except ImportError:  # source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))
    from diffusers_npu.inference import main

if __name__ == "__main__":
    sys.exit(main("inpainting"))
