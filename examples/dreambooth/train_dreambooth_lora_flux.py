#!/usr/bin/env python
"""DreamBooth-LoRA for FLUX.1: LoRA adapters in the transformer (and the CLIP encoder with --train_text_encoder)
learn a subject; the output is pytorch_lora_weights.safetensors (FluxPipeline.load_lora_weights).

Needs a local FLUX.1 pipeline folder (--pretrained_model_name_or_path); there is no embedded FLUX model. All
logic lives in diffusers_npu.train; run with --help for every flag (README, FLUX.1).
"""
import sys

from diffusers_npu.train import main

if __name__ == "__main__":
    sys.exit(main("dreambooth_lora_flux"))
