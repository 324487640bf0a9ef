"""``diffusers-npu selfcheck`` / ``bash test/npu_selfcheck.sh``: one command that shows whether this
machine's device runs diffusers-npu correctly -- written for the first person with an Ascend NPU, and run in
CI on the CPU (and on CUDA where a GPU is lent), so the same script is known to work before it meets an NPU.

It checks, on the device: every attention mode against float64 (self- and cross-attention, masks, fp32 /
fp16 / bf16 where the device has them); each optimizer 20 steps against float64 ``torch.optim.AdamW``; the
fused clip against ``torch.nn.utils.clip_grad_norm_`` (plain and under a GradScaler); an fp16 overflow step
through the GradScaler; fp32 matmuls against float64 (fp32 computed in fp16 fails); a resume of the fused
optimizer; attention forward and backward at SD 1.5 / 2.1 / SDXL shapes, whether the fused kernel really ran,
and a real-sized UNet training step (reduced sizes on the CPU, see ``realsize``); and short training runs of
the ``tiny`` preset in the launchers' precision x optimizer x attention combinations. It first prints which
device it checks and why, then one table (check, result, max error, time); rows that ran a fallback instead
of the NPU path are marked ``*``. The exit status is 0 only if nothing failed (a check the device cannot run
is a "skip", with why).
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from typing import List, Optional, Tuple

from .result import Result, format_table

EXIT_FAILED = 1


def environment(device: str) -> dict:
    """What ran the checks: device, SoC, versions, threads (for the JSON)."""
    import diffusers
    import torch

    from .. import __version__
    from .. import device as dev

    env = {"device": device, "device_name": dev.device_name(device), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "diffusers_npu": __version__, "python": platform.python_version(),
           "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"), "cpu_threads": torch.get_num_threads()}
    usable, why = dev.npu_status()
    env["npu_status"] = why
    if usable:
        env.update(soc=dev.npu_soc_name(), soc_version=dev.npu_soc_version(), torch_npu=dev.torch_npu_version(),
                   fusion_attention=dev.npu_supports_fusion_attention(), sdpa_fused=dev.npu_sdpa_is_fused(),
                   sdpa_masks_precise=dev.npu_sdpa_masks_precise())
    return env


def device_choice(requested: Optional[str]) -> Tuple[str, str]:
    """``(device, why)``: the device the self-check will check and one line saying why -- printed first, so
    that nobody reads a CPU run as NPU evidence."""
    from .. import device as dev

    device = dev.detect_device(requested)
    usable, npu_why = dev.npu_status()
    if requested:
        why = "chosen with --device"
    elif os.environ.get(dev.ENV_VAR, "").strip() not in ("", "auto"):
        why = f"chosen by ${dev.ENV_VAR}"
    elif device == "npu":
        why = f"detected: {npu_why}"
    else:
        why = f"no NPU ({npu_why})" + ("; a CUDA GPU was found" if device == "cuda" else "; no CUDA GPU either")
    if device != "npu":
        why += ": rows marked * ran a fallback, not the NPU path"
    return device, why


def run_selfcheck(device: Optional[str] = None, training: bool = True, steps: int = 10,
                  workdir: Optional[str] = None, progress=None, nproc: int = 1) -> dict:
    """Run every check on ``device`` (detected when None); returns the report (``results``: Result rows)."""
    from .. import device as dev
    from .numerics import numeric_checks
    from .realsize import realsize_checks
    from .training import training_checks

    device = dev.detect_device(device)
    report = {"environment": {}, "reference": "float64 on the CPU", "results": []}
    if device == "cpu":
        report["cpu_threads"] = dev.configure_cpu_threads()[1]
    else:
        report["device_settings"] = dev.apply_device_settings(device)
    report["environment"] = environment(device)
    started = time.perf_counter()
    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="dnpu-selfcheck-")
    results: List[Result] = report["results"]
    try:
        checks = [numeric_checks(device), realsize_checks(device)]
        if training:
            checks.append(training_checks(device, workdir, steps=steps))
        if nproc > 1:  # the multi-process section (distributed.py)
            from .distributed import distributed_checks

            checks.append(distributed_checks(device, nproc, workdir))
        for group in checks:
            for result in group:
                results.append(result)
                if progress:
                    progress(result)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    report["all_passed"] = not any(r.result == "FAIL" for r in results)
    report["counts"] = {k: sum(r.result == k for r in results) for k in ("pass", "FAIL", "skip")}
    report["counts"]["fallback"] = sum(bool(r.fallback) for r in results)
    return report


def write_report(report: dict, path: str) -> str:
    from ..fsutil import write_json_atomic

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    data = dict(report, results=[r.as_json() for r in report["results"]])
    return write_json_atomic(path, data)


def configure_parser(parser) -> None:
    parser.add_argument("--device", default=None, choices=("auto", "npu", "cuda", "cpu"),
                        help="device to check; default: the one training would use (NPU, else CUDA, else CPU)")
    parser.add_argument("--json", default="selfcheck.json", metavar="PATH",
                        help="where to write the results as JSON (default: selfcheck.json in the current folder)")
    parser.add_argument("--skip_training", action="store_true",
                        help="run only the numeric checks (attention, optimizers, clipping, fp16 scaling)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per training run (default: 10)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="also run the multi-process section on N processes (torchrun; gloo on CPU): DDP, "
                             "FSDP and DeepSpeed training steps against one process with the same global batch, "
                             "and an all-reduce bandwidth figure (default 1: skipped; at most 8)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="keep the tiny model, data and training outputs here (default: a temporary "
                             "folder, removed at the end)")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    from ..errors import UsageError

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1 (got {args.steps})")
    if not 1 <= args.nproc <= 8:  # the check's data set has 8 images, one per process and step
        raise UsageError(f"--nproc must be between 1 and 8 (got {args.nproc})")
    device = None if args.device in (None, "auto") else args.device
    try:
        device, why = device_choice(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device: {exc}") from None
    print(f"diffusers-npu self-check: checking {device} ({why})", flush=True)

    def progress(r: Result) -> None:
        print(f"  {r.result:<4} {r.check} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)

    report = run_selfcheck(device, training=not args.skip_training, steps=args.steps, workdir=args.workdir,
                           progress=progress, nproc=args.nproc)
    env = report["environment"]
    print(f"diffusers-npu self-check on {env['device']} ({env['device_name']}); {report.get('cpu_threads', '')}"
          .rstrip("; "))
    print(format_table(report["results"]))
    path = write_report(report, args.json)
    c = report["counts"]
    fallback = f" ({c['fallback']} on a fallback, marked *: no NPU evidence)" if c["fallback"] else ""
    print(f"{c['pass']} passed, {c['FAIL']} failed, {c['skip']} skipped{fallback} in {report['seconds']:.0f}s; "
          f"wrote {path}")
    return 0 if report["all_passed"] else EXIT_FAILED


def main(argv=None) -> int:
    from ..cliutil import ArgumentParser, run_main

    parser = ArgumentParser(prog="diffusers-npu selfcheck", description=__doc__.split("\n\n")[0])
    configure_parser(parser)

    def body():
        args = parser.parse_args(argv)
        return args.func(args)

    return run_main(body)
