#!/usr/bin/env python
"""Fine-tune Stable Diffusion on a few images of one subject (DreamBooth), optionally with prior
preservation and LoRA (--use_lora).

With no --pretrained_model_name_or_path / data flags it uses the embedded offline digits model and data set.
All logic lives in diffusers_npu.train; run with --help for every flag (docs/readme_downstream.md).
"""
import sys

from diffusers_npu.train import main
from diffusers_npu.train.tasks.dreambooth import DreamBoothTask

if __name__ == "__main__":
    sys.exit(main(DreamBoothTask))
