#!/usr/bin/env python
"""DreamBooth-LoRA for Stable Diffusion 3 / 3.5: LoRA adapters in the transformer (and both CLIP encoders with
--train_text_encoder) learn a subject; writes pytorch_lora_weights.safetensors.

With no --pretrained_model_name_or_path / data flags it uses the embedded offline SD3 digits model and data
set. All logic lives in diffusers_npu.train; run with --help for every flag (README, Stable Diffusion 3).
"""
import sys

from diffusers_npu.train import main

if __name__ == "__main__":
    sys.exit(main("dreambooth_lora_sd3"))
