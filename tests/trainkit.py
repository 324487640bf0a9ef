"""Helpers shared by the training tests: run a task in-process, call its entry point, read saved weights.

Runs train the embedded digits model (16 px, made once per session by conftest's ``embedded_paths``) for a
few steps with one torch thread: on a shared 2-core machine that is the fastest for such small models.
"""
from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--report_to", "none", "--disable_progress_bar", "--lr_warmup_steps", "0"]


def argv(out, steps=2, *extra, batch=4, ckpt=1000):
    return ["--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--checkpointing_steps", str(ckpt), *QUIET, *map(str, extra)]


def train(task, out, *extra, steps=2, batch=4, ckpt=1000) -> dict:
    """Train in-process; returns the summary (raises the project's errors)."""
    from diffusers_npu.train import run

    return run(task, argv(out, steps, *extra, batch=batch, ckpt=ckpt))


def main_rc(task, args, capsys=None):
    """The entry point in-process: (exit code, stdout, stderr)."""
    from diffusers_npu.train import main

    rc = main(task, [str(a) for a in args])
    if capsys is None:
        return rc, "", ""
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def weights(folder, sub="unet", name="diffusion_pytorch_model.safetensors") -> dict:
    """The tensors of a saved model folder (single file, or the sharded layout FSDP / ZeRO-3 runs write)."""
    from diffusers_npu.train.weights import read_state

    return read_state(os.path.join(str(folder), sub) if sub else str(folder), name)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def trainer_for(task, out, *flags):
    """A Trainer set up (models, data, optimizer, engine) but not run, to inspect what flags configured."""
    from diffusers_npu.train import prepare_args, task_class
    from diffusers_npu.train.loop import Trainer

    cls = task_class(task)
    t = Trainer(prepare_args(cls, argv(out, 2, *flags)), cls)
    t.setup()
    return t


def script(rel_path: str) -> str:
    return os.path.join(REPO, rel_path)


def run_subprocess(cmd, timeout=600, **env):
    import subprocess

    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable if c == "python" else c for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=e)


def free_port() -> int:
    """A free TCP port for a torchrun rendezvous (fixed ports collide with other test runs on the machine)."""
    from diffusers_npu.benchmark.upstream import free_port as free

    return free()
