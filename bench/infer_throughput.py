#!/usr/bin/env python
"""Inference throughput: the plain diffusers pipeline versus what `diffusers-npu generate` runs (the same loader
and the same speed-up function: fused attention, channels_last, torch.compile max-autotune with CUDA graphs on
CUDA). The JSON records the equivalent `generate` command.

    python bench/infer_throughput.py --preset tiny --device cpu --steps 5 --resolution 32   # CPU smoke run
    python bench/infer_throughput.py --preset sd21-base --json out.json          # GPU: 512 px, 50 steps, batch 1 and 4
    python bench/infer_throughput.py --preset sdxl --batch_sizes 1 --json out.json  # GPU: SDXL 1.0 base, 1024 px

All the logic is in :mod:`diffusers_npu.benchmark.infer`; ``--help`` lists the flags. Results: bench/RESULTS.md.
"""
import os
import sys

try:
    import diffusers_npu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from diffusers_npu.benchmark.infer import main

if __name__ == "__main__":
    main()
