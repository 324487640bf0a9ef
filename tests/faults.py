"""Seeded damage to checkpoint files, for the fault tests (in-process and under torchrun, see dist_worker.py).

A case copies the checkpoints of one training run into a fresh output folder -- hard links for every file but
the damaged one, so a case costs almost no disk -- and then flips bytes in, truncates, or deletes one file of
the newest checkpoint."""
from __future__ import annotations

import fnmatch
import os
import random
import shutil

FAULTS = ("flip", "truncate", "delete")

#: each kind of checkpoint file, as glob patterns over the paths a checkpoint lists (the first match is used;
#: later patterns cover other engines' layouts)
KINDS = {
    "weights": ["unet/diffusion_pytorch_model-00002-of-*.safetensors", "unet/*.safetensors"],
    "ema": ["unet_ema/diffusion_pytorch_model-00002-of-*.safetensors", "unet_ema/*.safetensors"],
    "optimizer": ["optimizer/__1_*.distcp", "optimizer/*.distcp", "optimizer.pt"],
    "rng": ["rng_1.pt", "rng_0.pt"],
    "train_state": ["train_state.json"],
    "scheduler": ["lr_scheduler.pt"],
    "precision": ["precision.pt"],
}


def files_of(folder: str) -> list:
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(out)


def pick(folder: str, kind: str) -> str:
    names = files_of(folder)
    for pattern in KINDS[kind]:
        hits = [n for n in names if fnmatch.fnmatch(n, pattern)]
        if hits:
            return hits[0]
    raise AssertionError(f"no {kind} file in {folder}: {names}")


def copy_checkpoints(src: str, dst: str, names=("checkpoint-2", "checkpoint-3")) -> None:
    """Hard-link copies of ``names`` (a damaged file is replaced by a real copy first, see :func:`damage`)."""
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name), copy_function=os.link)


def damage(folder: str, rel: str, fault: str, seed: int) -> str:
    """Damage ``folder/rel``; returns a description. Seeded: the same case damages the same bytes."""
    path = os.path.join(folder, rel)
    rng = random.Random(f"{seed}-{rel}-{fault}")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    size = len(data)
    os.remove(path)  # also breaks the hard link: the source checkpoint stays intact
    if fault == "delete":
        return f"deleted {rel}"
    if fault == "truncate":
        data = data[:rng.randrange(size)]
        what = f"truncated {rel} to {len(data)} of {size} bytes"
    else:
        n = min(64, size)
        start = rng.randrange(size - n + 1)
        for i in range(start, start + n):
            data[i] ^= 0xFF
        what = f"flipped {n} bytes of {rel} at offset {start}"
    with open(path, "wb") as f:
        f.write(bytes(data))
    return what
