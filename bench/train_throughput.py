#!/usr/bin/env python
"""Training throughput: the upstream diffusers example's step versus the diffusers-npu fast modes.

    python bench/train_throughput.py --preset tiny --device cpu                 # CPU smoke run (< 3 min)
    python bench/train_throughput.py --preset sd21-base --peak_tflops 989 --json out.json   # GPU: 512 px, batch 24

All the logic is in :mod:`diffusers_npu.benchmark.train` (see its docstring for what each mode does);
``--help`` lists the flags. Results and recipes: bench/RESULTS.md.
"""
import os
import sys

try:
    import diffusers_npu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from diffusers_npu.benchmark.train import main

if __name__ == "__main__":
    main()
