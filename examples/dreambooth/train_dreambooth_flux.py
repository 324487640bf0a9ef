#!/usr/bin/env python
"""DreamBooth for FLUX.1 (flow matching, packed latents, guidance embedding): fine-tune the transformer on a
subject's images, with prior preservation.

Needs a local FLUX.1 pipeline folder (--pretrained_model_name_or_path); there is no embedded FLUX model. All
logic lives in diffusers_npu.train; run with --help for every flag (README, FLUX.1).
"""
import sys

from diffusers_npu.train import main

if __name__ == "__main__":
    sys.exit(main("dreambooth_flux"))
