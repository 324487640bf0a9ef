#!/usr/bin/env python
"""Fine-tune a Stable Diffusion UNet on (image, caption) pairs.

With no --pretrained_model_name_or_path / --dataset_name it trains the embedded offline digits model on the
embedded digits data set. All logic lives in diffusers_npu.train; run with --help for every flag.
"""
import sys

from diffusers_npu.train import main
from diffusers_npu.train.tasks.text_to_image import TextToImageTask

if __name__ == "__main__":
    sys.exit(main(TextToImageTask))
