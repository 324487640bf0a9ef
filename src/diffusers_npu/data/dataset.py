"""Turning rows into training examples, in an order that survives a restart.

Design choice: every random decision about a sample (crop offset, flip, which caption of a list) is a pure
function of ``(seed, epoch, index)``. The sampler yields ``(epoch, index)`` pairs and the data set derives its
randomness from them. So the data a step sees depends on nothing else: not on the number of loader workers,
not on worker RNG state, not on whether the run was resumed mid-epoch. Exact resume then only needs the
sampler's position, which the trainer checkpoints.
"""
from __future__ import annotations

import hashlib
import io
import logging
import random

import numpy as np
import torch

from .sources import DataError

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int, salt: str = "") -> random.Random:
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}/{salt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for this rank forever (epoch after epoch), starting at a global position.

    One *global* batch of ``global_batch = per_device_batch * world_size`` consecutive entries of the epoch's
    permutation is split between ranks (rank r takes entries r*B .. r*B+B-1), and the incomplete tail of an
    epoch is dropped, so every rank sees the same number of batches and a global batch is the same set of
    samples whatever the world size. ``position`` counts global batches consumed since the start of training.
    """

    def __init__(self, num_samples: int, per_device_batch: int, seed: int, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True, start_position: int = 0):
        self.n = num_samples
        self.b = per_device_batch
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = per_device_batch * world_size
        self.batches_per_epoch = num_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"--train_batch_size: a global batch of {self.global_batch} "
                            f"({per_device_batch} x {world_size} processes) is larger than the data set "
                            f"({num_samples} samples); lower the batch size or add data")
        self.start_position = start_position

    def __iter__(self):
        pos = self.start_position
        while True:
            epoch, k = divmod(pos, self.batches_per_epoch)
            perm = epoch_permutation(self.n, self.seed, epoch, self.shuffle)
            start = k * self.global_batch + self.rank * self.b
            for i in perm[start:start + self.b]:
                yield (epoch, int(i))
            pos += 1

    def __len__(self):  # per epoch, per rank
        return self.batches_per_epoch * self.b


def load_pil(value, where: str):
    """Decode an image cell (PIL image, datasets' {'bytes','path'} dict, raw bytes or a path) to RGB PIL."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(value["path"])
            else:
                raise ValueError("empty image cell")
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            img = Image.open(value)
        else:
            raise ValueError(f"unsupported image value of type {type(value).__name__}")
        img.load()
        return img.convert("RGB")
    except Exception as e:
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        named = f" ({path})" if path else ""
        raise DataError(f"cannot read image {where}{named}: {type(e).__name__}: {e}") from e


def image_transform(img, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Resize (shorter side), crop, optionally flip; return a float tensor CHW in [-1, 1]."""
    from PIL import Image

    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if flip:
        t = t.flip(-1)
    return t


def choose_caption(value, rng: random.Random, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        return value[rng.randrange(len(value))]
    raise DataError(f"caption {where}: expected a string or a list of strings, got {type(value).__name__}"
                    f"{' (empty list)' if isinstance(value, (list, tuple)) and not value else ''}")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` -> {pixel_values, input_ids, index}, keyed by ``(epoch, index)``.

    ``skip_bad_images``: a row whose image cannot be decoded is replaced by the next good row (deterministic)
    and counted in ``bad_indices`` (per worker; the trainer reports the sum it observes in batches).
    """

    def __init__(self, hf_dataset, image_column, caption_column, tokenizer, resolution, center_crop=False,
                 random_flip=False, seed=0, skip_bad_images=False, name="data set", proportion_empty_prompts=0.0):
        self.ds = hf_dataset
        self.image_column = image_column
        self.caption_column = caption_column
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.name = name
        self.p_empty = proportion_empty_prompts

    def __len__(self):
        return len(self.ds)

    def tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                              truncation=True, return_tensors="pt").input_ids[0]

    def caption(self, epoch: int, index: int, row=None) -> str:
        row = self.ds[index] if row is None else row
        return choose_caption(row[self.caption_column], sample_rng(self.seed, epoch, index, "caption"),
                              f"row {index} of {self.name} (column {self.caption_column!r})")

    def flip_for(self, epoch: int, index: int) -> bool:
        return self.random_flip and sample_rng(self.seed, epoch, index, "flip").random() < 0.5

    def _example(self, epoch, index):
        row = self.ds[index]
        img = load_pil(row[self.image_column], f"row {index} of {self.name} (column {self.image_column!r})")
        rng = sample_rng(self.seed, epoch, index, "crop")
        pixels = image_transform(img, self.resolution, self.center_crop, self.flip_for(epoch, index), rng)
        out = {"pixel_values": pixels, "index": index, "epoch": epoch, "bad": 0}
        if self.caption_column is not None and self.tokenizer is not None:
            cap = self.caption(epoch, index, row)
            if self.p_empty and sample_rng(self.seed, epoch, index, "empty").random() < self.p_empty:
                cap = ""  # caption dropout teaches the unconditional prediction classifier-free guidance uses
            out["input_ids"] = self.tokenize(cap)
            out["caption"] = cap
        return out

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not self.skip_bad_images:
            return self._example(epoch, index)
        for step in range(len(self.ds)):
            j = (index + step) % len(self.ds)
            try:
                ex = self._example(epoch, j)
                ex["bad"] = step  # how many bad rows were skipped to get here
                return ex
            except DataError as e:
                if step == 0:
                    logger.warning("skipping %s", e)
        raise DataError(f"--skip_bad_images: no readable image in {self.name}")


def collate(examples):
    """Stack tensor fields present in the examples; keep captions as a list."""
    batch = {"index": torch.tensor([e["index"] for e in examples]),
             "epoch": torch.tensor([e.get("epoch", 0) for e in examples]),
             "bad": torch.tensor([e.get("bad", 0) for e in examples])}
    for key, value in examples[0].items():
        if key in batch:
            continue
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([e[key] for e in examples])
        elif key == "caption":
            batch[key] = [e[key] for e in examples]
    return batch
