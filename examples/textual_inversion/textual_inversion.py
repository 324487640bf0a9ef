#!/usr/bin/env python
"""Learn a new token's embedding for a concept (textual inversion); writes learned_embeds.safetensors.

With no --pretrained_model_name_or_path / data flags it uses the embedded offline digits model and data set.
All logic lives in diffusers_npu.train; run with --help for every flag (docs/readme_downstream.md).
"""
import sys

from diffusers_npu.train import main
from diffusers_npu.train.tasks.textual_inversion import TextualInversionTask

if __name__ == "__main__":
    sys.exit(main(TextualInversionTask))
