"""One timed Trainer run in its own process (one rank of it under torchrun):

    python -m diffusers_npu.benchmark.worker SPEC.json
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m diffusers_npu.benchmark.worker SPEC.json

SPEC: ``{"task", "argv", "steps", "warmup", "out"}``. Each rank writes ``<out>.rank<R>.json``: the measurement
of :func:`~diffusers_npu.benchmark.trainer_step.time_trainer`, or ``{"error": ...}`` with one line saying why.
"""
from __future__ import annotations

import json
import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m diffusers_npu.benchmark.worker SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    rank = int(os.environ.get("RANK", "0") or 0)
    from ..fsutil import write_json_atomic
    from .common import error_line
    from .trainer_step import time_trainer

    try:
        result = time_trainer(spec["task"], spec["argv"], spec["steps"], spec["warmup"])
        code = 0
    except BaseException as e:  # the harness reports it as the mode's row
        result, code = {"rank": rank, "error": error_line(e)}, 1
    write_json_atomic(f"{spec['out']}.rank{rank}.json", result)
    return code


if __name__ == "__main__":
    sys.exit(main())
