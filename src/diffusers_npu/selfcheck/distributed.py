"""The self-check's multi-process section (``diffusers-npu selfcheck --nproc N``, ``test/npu_selfcheck.sh
--nproc N``): the Trainer's real steps on N processes under each engine (DDP, FSDP, DeepSpeed ZeRO-2) against
one process with the same global batch, and an all-reduce bandwidth figure.

The N processes run under torchrun (``python -m diffusers_npu.selfcheck.distributed --worker SPEC``) in one
process group, one training run per engine; the reference runs in this process. Each run trains the ``tiny``
preset 2 steps in fp32 with AdamW at a huge epsilon (1e3), which makes the update proportional to the
(clipped) gradient: ``lr * (1 - beta1) * g / eps`` rather than its sign, so comparing the saved UNets compares
the gradients the engines averaged. One process with batch N and N processes with batch 1 each see the same
samples with the same per-sample noise (``--per_sample_noise``), so they compute the same sums in another
order: fp32 rounding differs by about 1e-6 of the update. The tolerance, 0.1% of the largest update, leaves a
wide margin for that and still catches every real fault: a gradient summed instead of averaged (100% off at
N = 2), a rank's gradient missing (50%), a step not taken or taken twice (100%), a clip that measured only the
local shard (the clip factor changes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional

from .result import Result

ENGINES = ("ddp", "fsdp", "deepspeed")
STEPS = 2
#: the comparison's tolerance: 0.1% of the largest update (see the module docstring)
TOLERANCE = 1e-3
#: all-reduce message: 64 MiB of fp32, 2 warm-up and 5 timed rounds
BANDWIDTH_BYTES = 64 * 2 ** 20
BANDWIDTH_ROUNDS = 5


def compare_flags(batch: int) -> List[str]:
    """What every run of the section adds to the self-check's command line (argparse keeps the last)."""
    return ["--train_batch_size", str(batch), "--mixed_precision", "no", "--per_sample_noise", "--learning_rate",
            "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0", "--optimizer", "adamw"]


def update_error(base_dir: str, reference_dir: str, other_dir: str) -> tuple:
    """``(max |update difference| / max |reference update|, max |reference update|)`` of the saved UNets."""
    import torch

    from ..train.weights import read_state

    base, ref, other = (read_state(os.path.join(d, "unet")) for d in (base_dir, reference_dir, other_dir))
    if set(other) != set(base):
        raise ValueError("the saved UNet has other tensors than the base model")
    d_ref = torch.cat([(ref[k].double() - base[k].double()).flatten() for k in base])
    d_other = torch.cat([(other[k].double() - base[k].double()).flatten() for k in base])
    largest = float(d_ref.abs().max())
    return (float((d_other - d_ref).abs().max()) / largest if largest else float("inf")), largest


def distributed_checks(device: str, nproc: int, workdir: str, seed: int = 0) -> Iterator[Result]:
    """One Result per engine (N processes against 1) and one for the all-reduce bandwidth."""
    from .training import _no_progress_bars, _quiet, argv_for, prepare_inputs

    model, data = prepare_inputs(workdir, seed)
    root = os.path.join(workdir, f"dist{nproc}")
    reference = os.path.join(root, "reference")
    try:
        from .. import train

        with _quiet(), _no_progress_bars():
            train.run("text_to_image", argv_for(model, data, reference, device, {}, None, STEPS)
                      + compare_flags(nproc))
        ref_error = None
    except Exception as exc:  # noqa: BLE001 - a failed reference fails every row, with its reason
        ref_error = f"the 1-process reference failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    engines = [e for e in ENGINES if e != "deepspeed" or importlib.util.find_spec("deepspeed")]
    spec = {"device": device, "engines": engines, "runs": {},
            "argv": {e: argv_for(model, data, os.path.join(root, e), device, {"distributed": e}, None, STEPS)
                     + compare_flags(1) for e in engines},
            "report": os.path.join(root, "worker.json")}
    os.makedirs(root, exist_ok=True)
    spec_path = os.path.join(root, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    proc = _launch(nproc, spec_path, device)
    try:
        with open(spec["report"], encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        tail = (proc.stdout or "").strip().splitlines()[-3:]
        report = {"runs": {}, "error": f"torchrun exited {proc.returncode}: " + " | ".join(tail)[-300:]}

    for engine in ENGINES:
        name = f"{nproc} processes x batch 1 vs 1 x batch {nproc}: {engine}"
        if engine not in engines:
            yield Result(name, "skip", note="DeepSpeed is not installed (pip install --no-build-isolation -e '.[deepspeed]' in the checkout)")
            continue
        run = report["runs"].get(engine)
        argv = ["torchrun", "--nproc_per_node", str(nproc), "...", *spec["argv"][engine]]
        if ref_error or run is None or run.get("error"):
            why = ref_error or (run or {}).get("error") or report.get("error") or "no result from the worker"
            yield _row(name, "FAIL", why, run, argv, root, workdir)
            continue
        try:
            err, largest = update_error(model, reference, os.path.join(root, engine))
        except (OSError, ValueError) as exc:
            yield _row(name, "FAIL", f"{type(exc).__name__}: {exc}", run, argv, root, workdir)
            continue
        if largest == 0:
            yield _row(name, "FAIL", "the 1-process reference did not change the UNet", run, argv, root, workdir)
        elif err > TOLERANCE:
            yield _row(name, "FAIL", f"update differs by {err:.2e} of the largest update (tolerance {TOLERANCE:g})",
                       run, argv, root, workdir, err)
        else:
            yield _row(name, "pass", f"update within {err:.1e} of the 1-process one (tolerance {TOLERANCE:g})",
                       run, argv, root, workdir, err)
    bw = report.get("allreduce")
    name = f"all-reduce {nproc} processes, {BANDWIDTH_BYTES // 2 ** 20} MiB fp32"
    if not bw:
        yield Result(name, "FAIL", note=report.get("error") or "no bandwidth figure from the worker", seconds=0.0)
    else:
        yield Result(name, "pass", note=f"bus bandwidth {bw['bus_gb_s']:.2f} GB/s (algorithm {bw['alg_gb_s']:.2f} "
                                        f"GB/s, {bw['seconds'] * 1e3:.1f} ms per round, {bw['backend']})",
                     seconds=bw["seconds"] * BANDWIDTH_ROUNDS)


def _row(name, result, note, run, argv, root, workdir, err=None) -> Result:
    r = Result(name, result, max_error=err, tolerance=TOLERANCE if err is not None else None, note=note,
               seconds=float((run or {}).get("seconds", 0.0)))
    r.argv = [a.replace(workdir, "<workdir>") for a in argv]
    return r


def _launch(nproc: int, spec_path: str, device: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # torchrun runs N gloo processes (accelerate launch --cpu runs 1)
        env.setdefault("OMP_NUM_THREADS", "1")
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--module", "diffusers_npu.selfcheck.distributed", "--worker", spec_path]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


# ------------------------------------------------------------------------------------------ the worker
def _worker(spec_path: str) -> int:
    """Under torchrun: train once per engine in one process group, then time the all-reduce; rank 0 writes
    the report."""
    import torch

    from .. import train
    from .training import _no_progress_bars, _quiet

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    runs: Dict[str, dict] = {}
    for engine in spec["engines"]:
        started = time.perf_counter()
        try:
            with _quiet(), _no_progress_bars():
                train.run("text_to_image", spec["argv"][engine])
            runs[engine] = {"seconds": time.perf_counter() - started}
        except Exception as exc:  # noqa: BLE001 - the row reports it
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            runs[engine] = {"seconds": time.perf_counter() - started, "error": f"{type(exc).__name__}: {text}"}
    report = {"runs": runs, "allreduce": _allreduce(torch, spec["device"])}
    if rank == 0:
        from ..fsutil import write_json_atomic

        write_json_atomic(spec["report"], report)
    return 0


def _allreduce(torch, device: str) -> Optional[dict]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    n = dist.get_world_size()
    where = torch.device("cpu") if device == "cpu" else torch.device(device, int(os.environ.get("LOCAL_RANK", 0)))
    x = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=where)
    from .. import device as dev

    for _ in range(2):
        dist.all_reduce(x)
    dev.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(BANDWIDTH_ROUNDS):
        dist.all_reduce(x)
    dev.synchronize(device)
    seconds = (time.perf_counter() - t0) / BANDWIDTH_ROUNDS
    # nccl-tests' definitions: algorithm bandwidth = bytes / time; bus bandwidth = that x 2(n-1)/n, the
    # traffic each link of a ring carries, comparable across process counts.
    alg = BANDWIDTH_BYTES / seconds / 1e9
    return {"seconds": seconds, "alg_gb_s": alg, "bus_gb_s": alg * 2 * (n - 1) / n, "backend": dist.get_backend()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_npu.selfcheck.distributed",
                                     description="the worker of the self-check's multi-process section")
    parser.add_argument("--worker", required=True, metavar="SPEC", help="the spec JSON written by the self-check")
    args = parser.parse_args(argv)
    return _worker(args.worker)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ENGINES", "TOLERANCE", "compare_flags", "distributed_checks", "update_error"]
