#!/usr/bin/env python
r"""Peak memory and latent-cache build time against rows and processes (issue #24).

    python bench/data_scale.py                       # 2,000 and 10,000 rows, builds with 1 and 2 processes
    python bench/data_scale.py --rows 500 --procs 1  # a quick look

All the logic is in :mod:`diffusers_npu.benchmark.data_scale`; ``--help`` lists the flags. Results: bench/RESULTS.md.
"""
import os
import sys

try:
    import diffusers_npu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from diffusers_npu.benchmark.data_scale import cli

if __name__ == "__main__":
    sys.exit(cli())
