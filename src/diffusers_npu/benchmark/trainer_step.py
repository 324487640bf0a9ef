"""Timing the real training step: :meth:`diffusers_npu.train.loop.Trainer.train_step`.

:func:`time_trainer` builds the Trainer exactly as ``examples/<task>/<script>.py ARGV`` does
(``prepare_args(task, argv)`` + ``Trainer(args, task)`` + ``setup()``), takes the loader iterator the training
loop takes (``iter(trainer.loader(0))``), then:

1. runs ``warmup`` steps (compilation, allocator growth, loader start-up) and reads the loss buffer;
2. synchronises the device (and, with several processes, waits for every rank), starts the clock;
3. runs ``steps`` calls of ``trainer.train_step(loader)``, reading the loss buffer every ``--log_every`` steps
   as the training loop's flush does (one host transfer, averaged over ranks) -- without the flush's other
   work (log lines, checkpoint and validation checks), which a benchmark must not trigger;
4. reads the remaining losses, synchronises (and waits for every rank) and stops the clock.

images/s = processes x batch x accumulation x steps / that wall time (data loading included). The process's CPU
time over the same window is recorded too (``cpu_ms_per_step``): on a shared CPU, where the wall time depends on
what else runs, it measures the step's own work (loader worker processes are not in it).

Run by the harness in its own process, or per rank by :mod:`diffusers_npu.benchmark.worker` under torchrun.
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import tempfile
import time

import torch

from . import common


def local_bytes(t) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local shard under FSDP)."""
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(trainer) -> dict:
    """Per-rank bytes of the trained parameters, their gradients and the optimizer state (local shards)."""
    try:
        params = list(trainer.params)
        opt = 0
        for state in trainer.optimizer.state.values():
            opt += sum(local_bytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        return {"param_bytes": sum(local_bytes(p) for p in params),
                "grad_bytes": sum(local_bytes(p.grad) for p in params),
                "optimizer_state_bytes": opt,
                "trained_parameters": sum(p.numel() for p in params)}
    except (AttributeError, TypeError, RuntimeError):  # an engine that hides its state (DeepSpeed): not known
        return {"param_bytes": None, "grad_bytes": None, "optimizer_state_bytes": None, "trained_parameters": None}


def time_trainer(task_name: str, argv: list, steps: int, warmup: int) -> dict:
    """Build the Trainer from ``argv`` (a training script's flags) and time ``steps`` calls of
    ``Trainer.train_step``. Returns the measurement of this rank (rank 0's wall time covers every rank)."""
    from ..train import prepare_args, task_class
    from ..train.loop import Trainer

    task_cls = task_class(task_name)
    args = prepare_args(task_cls, argv)
    trainer = Trainer(args, task_cls)
    device = args.device
    loader = None
    try:
        t0 = time.perf_counter()
        trainer.setup()
        setup_s = time.perf_counter() - t0
        rt = trainer.rt
        world = rt.world_size
        losses: list = []

        def read_buffer():
            # Trainer.flush's read-back: the buffered per-step values (one transfer), the device sync and the
            # fp16 scale record -- without the log lines, checkpoints or validation a run does at a flush.
            losses.extend(r["loss"] for r in trainer.read_buffer())

        def run_steps(n):
            # what Trainer.run does per step, with its flush's read-back every --log_every steps
            for i in range(n):
                trainer.train_step(loader)
                if (i + 1) % args.log_every == 0:
                    read_buffer()
            read_buffer()
            common.sync(device)
            rt.barrier()

        loader = iter(trainer.loader(0))
        common.sync(device)
        t0 = time.perf_counter()
        run_steps(warmup)
        warmup_s = time.perf_counter() - t0
        common.reset_memory(device, collect=False)  # the peak of the timed steps, not of compilation or caching
        skipped0 = trainer.precision.skipped
        rt.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        run_steps(steps)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        timed = losses[-steps:]
        finite = [v for v in timed if math.isfinite(v)]
        images_per_step = args.train_batch_size * args.gradient_accumulation_steps
        return {
            "task": task_cls.name,
            "rank": rt.rank,
            "world_size": world,
            "distributed": trainer.engine.distributed,
            "precision": precision_label(args.mixed_precision, trainer.precision.scaler is not None),
            "images_per_sec": world * images_per_step * steps / wall,
            "images_per_sec_per_device": images_per_step * steps / wall,
            "ms_per_step": 1000.0 * wall / steps,
            "wall_s": wall,
            "cpu_ms_per_step": 1000.0 * cpu / steps,
            "warmup_s": warmup_s,
            "setup_s": setup_s,
            "peak_memory_bytes": common.peak_memory(device),
            "mean_loss": sum(finite) / len(finite) if finite else None,
            "nonfinite_losses": len(timed) - len(finite),
            "fp16_skipped_steps": trainer.precision.skipped - skipped0,
            "cache": trainer.cache_info,
            "resolved": {k: _plain(getattr(args, k, None)) for k in RESOLVED_KEYS},
            **state_bytes(trainer),
        }
    finally:
        loader = None  # stops persistent loader workers
        trainer.close()
        shutil.rmtree(args.output_dir, ignore_errors=True)
        trainer = None  # drops the last reference before the collection below
        if args.compile:  # compiled graphs keep the model's memory alive in dynamo's caches
            torch._dynamo.reset()
        gc.collect()
        common.reset_memory(device)


#: resolved settings recorded with each measurement (what the Trainer actually used)
RESOLVED_KEYS = ("resolution", "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "optimizer",
                 "attention", "channels_last", "compile", "cache_latents", "gradient_checkpointing", "use_ema",
                 "log_every", "max_grad_norm", "dataloader_num_workers", "use_lora", "lora_rank", "distributed",
                 "max_sequence_length")


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def precision_label(name, scaler: bool) -> str:
    if name in (None, "no"):
        return "fp32"
    return f"{name} autocast" + (" + GradScaler" if scaler else "")


def output_dir() -> str:
    """A fresh --output_dir for one timed run (removed afterwards: nothing is saved)."""
    return tempfile.mkdtemp(prefix="dnpu-bench-out-")


def threads_env(threads) -> None:
    """The Trainer takes OMP_NUM_THREADS as the user's thread choice; the harness sets it that way."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(int(threads))
