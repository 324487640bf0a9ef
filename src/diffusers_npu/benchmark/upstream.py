"""``upstream``: the real upstream example script (``--upstream_script PATH``, a copy the user supplies; never part
of this project), run on the same model folder and image folder as the Trainer modes.

How it is timed: the script runs unchanged in a child process (``python -m diffusers_npu.benchmark.upstream
SCRIPT ARGS``, or under torchrun with ``--nproc``). Before the script starts, this module replaces
``tqdm.auto.tqdm`` with a subclass that, for the script's training bar (``desc="Steps"``, as every upstream
example names it), writes ``step N T C`` (``T`` = ``time.perf_counter()``, ``C`` = the process's CPU time) to
the stamp file
(``$DIFFUSERS_NPU_BENCH_STAMPS``, apart from the script's own output) at each ``progress_bar.update``:
upstream updates its bar once per optimizer step. images/s = processes x batch x S / (T[W + S] - T[W]) over
the S steps after W warm-up steps. Upstream reads ``loss.item()`` in every step, so the device is never more
than one step ahead of these stamps. At the end the child writes ``peak_memory BYTES`` (the device
allocator's peak, or the peak RSS on CPU). Model loading, data set preparation and the final save are outside
the window.
"""
from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import time

STAMPS_ENV = "DIFFUSERS_NPU_BENCH_STAMPS"
STEP_RE = re.compile(r"^step (\d+) ([0-9.]+) ([0-9.]+)$", re.M)
PEAK_RE = re.compile(r"^peak_memory (\d+)$", re.M)


def upstream_argv(model: str, data: str, resolution: int, batch_size: int, total_steps: int, output_dir: str,
                  precision: str, seed: int = 0, extra: str = "") -> list:
    """The upstream command line for the harness's model and data (upstream's own flag names)."""
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", str(resolution),
            "--center_crop", "--random_flip", "--train_batch_size", str(batch_size), "--max_train_steps",
            str(total_steps), "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--max_grad_norm", "1",
            "--checkpointing_steps", str(10 ** 9), "--seed", str(seed), "--output_dir", output_dir,
            "--dataloader_num_workers", "0"]
    if precision in ("fp16", "bf16"):
        argv += ["--mixed_precision", precision]
    return argv + shlex.split(extra or "")


def launch_command(script: str, argv: list, nproc: int, port: int) -> list:
    shim = [sys.executable, "-m", "diffusers_npu.benchmark.upstream"]
    if nproc > 1:
        shim = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(port), "-m", "diffusers_npu.benchmark.upstream"]
    return shim + [os.path.abspath(script)] + argv


def run_upstream(script: str, argv: list, batch_size: int, steps: int, warmup: int, nproc: int, env: dict,
                 port: int, log_path: str, timeout: float = 3600) -> dict:
    """Run the script, parse its step stamps; the measurement (or ``error``) as a dict."""
    if not os.path.isfile(script):
        return {"error": f"--upstream_script: {script} does not exist"}
    from .processes import last_line

    cmd = launch_command(script, argv, nproc, port)
    stamp_path = log_path + ".stamps"
    open(stamp_path, "w").close()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, env={**env, STAMPS_ENV: stamp_path}, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    total_s = time.perf_counter() - t0
    with open(stamp_path) as f:
        out = f.read()
    stamps = {int(n): float(t) for n, t, _ in STEP_RE.findall(out)}
    cpu = {int(n): float(c) for n, _, c in STEP_RE.findall(out)}
    w = max(1, warmup)
    if code != 0 or w not in stamps or (w + steps) not in stamps:
        why = "timed out" if code is None else f"exit code {code}"
        return {"error": f"the upstream script failed ({why}; {len(stamps)} step stamps); last log line: "
                         f"{last_line(log_path)}"}
    wall = stamps[w + steps] - stamps[w]
    peak = PEAK_RE.findall(out)
    return {"images_per_sec": nproc * batch_size * steps / wall, "images_per_sec_per_device": batch_size * steps / wall,
            "ms_per_step": 1000.0 * wall / steps, "wall_s": wall, "warmup_s": None,
            "cpu_ms_per_step": 1000.0 * (cpu[w + steps] - cpu[w]) / steps,
            "process_s": total_s, "peak_memory_bytes": int(peak[-1]) if peak else None, "world_size": nproc,
            "timing": "between the script's progress-bar updates (one per optimizer step)", "log": log_path}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="dnpu-bench-upstream-")


# ----------------------------------------------------------------------------------------- the child side
def _install_step_stamps() -> None:
    import tqdm.auto

    base = tqdm.auto.tqdm
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    stamps = os.environ.get(STAMPS_ENV)

    class StampedBar(base):
        def __init__(self, *args, **kwargs):
            self._bench_steps = kwargs.get("desc") == "Steps"
            self._bench_count = kwargs.get("initial", 0) or 0
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            result = super().update(n)
            if self._bench_steps and rank0:
                self._bench_count += n
                _stamp(stamps, f"step {self._bench_count} {time.perf_counter():.6f} {time.process_time():.6f}")
            return result

    tqdm.auto.tqdm = StampedBar


def _stamp(path, line: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    else:
        print(line, file=sys.stderr, flush=True)


def _peak_memory() -> int:
    from ..device import detect_device, peak_memory_bytes

    return peak_memory_bytes(detect_device())


def main(argv=None) -> int:
    """``python -m diffusers_npu.benchmark.upstream SCRIPT ARGS...``: run SCRIPT as ``__main__`` with step stamps."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m diffusers_npu.benchmark.upstream SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script = argv[0]
    _install_step_stamps()
    sys.argv = [script] + list(argv[1:])
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:  # also when the script ends with sys.exit()
        if int(os.environ.get("RANK", "0") or 0) == 0:
            _stamp(os.environ.get(STAMPS_ENV), f"peak_memory {_peak_memory()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
