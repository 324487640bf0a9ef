#!/usr/bin/env python
"""Text-to-image guided by a ControlNet and a conditioning image (StableDiffusionControlNetPipeline, or
StableDiffusionXLControlNetPipeline for SDXL folders), e.g. our ControlNet training output.

Flags instead of code edits: run with --help. Same as `diffusers-npu generate controlnet ...`;
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
    sys.exit(main("controlnet"))
