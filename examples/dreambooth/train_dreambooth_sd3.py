#!/usr/bin/env python
"""DreamBooth for Stable Diffusion 3 / 3.5 (flow matching): fine-tune the transformer on a subject's images,
optionally both CLIP text encoders, with prior preservation.

With no --pretrained_model_name_or_path / data flags it uses the embedded offline SD3 digits model and data
set. All logic lives in diffusers_npu.train; run with --help for every flag (README, Stable Diffusion 3).
"""
import sys

from diffusers_npu.train import main

if __name__ == "__main__":
    sys.exit(main("dreambooth_sd3"))
