"""Timed Trainer runs in child processes: one process (a clean peak-memory figure per mode), or ``nproc`` ranks
under torchrun (``--distributed ddp|fsdp``; on CPU with ``ACCELERATE_USE_CPU=true`` and gloo, as the
project's launchers do).

Each rank of :mod:`diffusers_npu.benchmark.worker` writes its own measurement; :func:`combine` turns them into one
row: images/s in total (rank 0's window, which the ranks enter and leave together) and per device, and the
per-rank peak memory and parameter / gradient / optimizer-state bytes.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile

from ..fsutil import write_json_atomic


def child_env(device: str, threads, nproc: int) -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # what the project's launchers set for CPU ranks (gloo)
    return env


def worker_command(spec_path: str, nproc: int, port: int) -> list:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(port), "-m", "diffusers_npu.benchmark.worker", spec_path]
    return [sys.executable, "-m", "diffusers_npu.benchmark.worker", spec_path]


def run_trainer_processes(task: str, argv: list, steps: int, warmup: int, nproc: int, env: dict, port: int,
                          log_path: str, timeout: float = 3600) -> dict:
    """Run the timed Trainer in ``nproc`` processes; one combined row (or ``error``)."""
    work = tempfile.mkdtemp(prefix="dnpu-bench-worker-")
    spec_path = os.path.join(work, "spec.json")
    out = os.path.join(work, "result")
    write_json_atomic(spec_path, {"task": task, "argv": argv, "steps": steps, "warmup": warmup, "out": out})
    cmd = worker_command(spec_path, nproc, port)
    try:
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            try:
                code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = None
        ranks = []
        for path in sorted(glob.glob(out + ".rank*.json")):
            with open(path) as f:
                ranks.append(json.load(f))
        return combine(ranks, nproc, code, log_path)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def last_line(path: str) -> str:
    """Why a child died when it could not say so itself: the last exception line of its log (``XyzError: ...``),
    else its last line (progress bars' carriage returns count as line ends)."""
    import re

    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in re.split(r"[\r\n]+", f.read()) if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    return (errors or lines or ["(empty log)"])[-1][:240]


def combine(ranks: list, nproc: int, code, log_path: str) -> dict:
    errors = [r["error"] for r in ranks if "error" in r]
    if errors or len(ranks) != nproc:
        why = errors[0] if errors else (f"{len(ranks)} of {nproc} ranks reported "
                                        f"({'timed out' if code is None else f'exit code {code}'}; last log line: "
                                        f"{last_line(log_path)})")
        return {"error": why}
    ranks.sort(key=lambda r: r["rank"])
    r0 = dict(ranks[0])
    per_rank = ("peak_memory_bytes", "param_bytes", "grad_bytes", "optimizer_state_bytes")
    for k in per_rank:
        r0[f"{k}_per_rank"] = [r[k] for r in ranks]
        known = [r[k] for r in ranks if r.get(k) is not None]
        r0[k] = max(known) if known else None  # the figure that must fit on every device
    r0["log"] = log_path
    return r0
