#!/usr/bin/env python
"""ControlNet for FLUX.1 (flow matching, packed latents, guidance embedding): train a FluxControlNetModel that
steers the frozen transformer with a conditioning image.

Needs --pretrained_model_name_or_path (a local FLUX.1 pipeline folder; there is no embedded FLUX model) and a
data set (--dataset_name or --jsonl_for_train; a conditioning_image column, or conditioning derived from the
image). All logic lives in diffusers_npu.train; run with --help for every flag (README, FLUX.1).
"""
import sys

from diffusers_npu.train import main

if __name__ == "__main__":
    sys.exit(main("controlnet_flux"))
