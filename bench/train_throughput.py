#!/usr/bin/env python
r"""Training throughput of the real Trainer step (Trainer.train_step), built from a training script's flags.

    python bench/train_throughput.py --preset tiny --device cpu                  # CPU run (about a minute)
    python bench/train_throughput.py --preset tiny --device cpu --nproc 2 --distributed ddp,fsdp
    python bench/train_throughput.py --preset sd21-base --peak_tflops 989 --json out.json   # GPU: 512 px, batch 24
    python bench/train_throughput.py --preset embedded \
        --flags="--config examples/text_to_image/configs/embedded_digits.yaml"

All the logic is in :mod:`diffusers_npu.benchmark.train` (its docstring says what each mode does); ``--help``
lists the flags. Results and recipes: bench/RESULTS.md.
"""
import os
import sys

try:
    import diffusers_npu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from diffusers_npu.benchmark.train import cli

if __name__ == "__main__":
    sys.exit(cli())
