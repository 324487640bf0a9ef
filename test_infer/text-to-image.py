#!/usr/bin/env python
"""Text-to-image inference (LDM text2im as in the original, Stable Diffusion, Stable Diffusion XL with an
optional --refiner, or any pipeline whose model_index.json declares a text-to-image class). --lora loads
LoRA weights.

Flags instead of code edits: run with --help. Same as `diffusers-npu generate text-to-image ...`;
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
    sys.exit(main("text-to-image"))
