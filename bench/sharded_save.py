#!/usr/bin/env python
r"""Memory of a sharded save (issue #19): each rank's resident-memory growth while the real trainer writes a
checkpoint and the final output under FSDP, against its shard plus the largest tensor.

    python bench/sharded_save.py                 # 2 processes, a ~100 M-parameter UNet, CPU (gloo)

All the logic is in :mod:`diffusers_npu.benchmark.sharded_save`; ``--help`` lists the flags. Results: bench/RESULTS.md.
"""
import os
import sys

try:
    import diffusers_npu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from diffusers_npu.benchmark.sharded_save import cli

if __name__ == "__main__":
    sys.exit(cli())
