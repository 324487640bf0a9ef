"""Turning rows into training examples, in an order that survives a restart.

Design choice: every random decision about a sample (crop offset, flip, which caption of a list, caption
dropout) is a pure function of ``(seed, epoch, index)``. The samplers (:mod:`.sampling`) yield keys
``(epoch, index)`` or ``(epoch, index, bucket)`` and the data set derives its randomness from them. So the
data a step sees depends on nothing else: not on the number of loader workers, not on worker RNG state, not
on whether the run was resumed mid-epoch. Exact resume then only needs the sampler's position.

Every example also carries the SDXL micro-conditioning of its real crop: ``original_size`` (h, w before
resizing), ``crop_top_left`` (in the resized image, as shown to the model: after a flip, in the mirrored
image) and ``target_size`` (h, w of the crop).
"""
from __future__ import annotations

import hashlib
import logging
import random

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, UsageError
from .buckets import Buckets
from .images import (DEFAULT_INTERPOLATION, DERIVED_CONDITIONING, INTERPOLATIONS, covering_size,
                     derive_conditioning, image_transform, load_pil, resize_crop, to_tensor)
from .sampling import epoch_permutation

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, index: int, salt: str = "") -> random.Random:
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}/{salt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def choose_caption(value, rng: random.Random, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and all(isinstance(v, str) for v in value):
        return value[rng.randrange(len(value))]
    raise DataError(f"caption {where}: expected a string or a list of strings, got {type(value).__name__}"
                    f"{' (empty list)' if isinstance(value, (list, tuple)) and not value else ''}")


def caption_options(value, where: str) -> list[str]:
    """All captions a cell may yield (validated as :func:`choose_caption` does)."""
    choose_caption(value, random.Random(0), where)
    return [value] if isinstance(value, str) else list(value)


def undecoded(ds, columns):
    """Have ``datasets`` hand over raw image bytes/paths so that *we* decode them: a corrupt file then fails
    in our code with its row and file name, or is skipped by --skip_bad_images."""
    if not hasattr(ds, "features"):
        return ds
    from datasets import Image as ImageFeature

    for column in columns:
        feature = ds.features.get(column)
        if isinstance(feature, ImageFeature) and feature.decode:
            ds = ds.cast_column(column, ImageFeature(decode=False))
    return ds


def parse_key(key):
    """``(epoch, index[, bucket])`` or a bare index -> (epoch, index, bucket or None)."""
    if isinstance(key, tuple):
        return (int(key[0]), int(key[1]), int(key[2])) if len(key) == 3 else (int(key[0]), int(key[1]), None)
    return 0, int(key), None


class ClipTokenize:
    """``tokenize`` for one CLIP tokenizer: ``{"input_ids": LongTensor[L]}`` (a class, not a closure, so that
    the data set pickles into spawned loader workers)."""

    def __init__(self, tokenizer, key: str = "input_ids"):
        self.tokenizer, self.key = tokenizer, key

    def __call__(self, caption: str) -> dict:
        t = self.tokenizer
        ids = t(caption, max_length=t.model_max_length, padding="max_length", truncation=True,
                return_tensors="pt").input_ids[0]
        return {self.key: ids}


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Rows of a ``datasets.Dataset`` -> training examples, keyed by ``(epoch, index[, bucket])``.

    An example holds ``pixel_values`` (3 x H x W in [-1, 1]), the fields of ``tokenize(caption)``, ``caption``,
    ``original_size`` / ``crop_top_left`` / ``target_size`` (LongTensor [2] each), ``index`` (the row actually
    used), ``epoch`` and ``bad`` (rows skipped to get a readable one).

    * ``buckets`` (:class:`~.buckets.Buckets`): the crop size is the key's bucket (or the row's, for a key
      without one) instead of ``resolution`` x ``resolution``.
    * ``paired_columns`` ``{output key: column}``: more image columns (ControlNet's conditioning image) given
      EXACTLY the image's resize, crop and flip, in [0, 1]. A paired image of another size is first resized
      to the image's covering size, so pixel-aligned maps stay aligned.
    * ``derived`` ``{output key: "sobel" | "blur"}``: a [0, 1] conditioning made from the transformed image.
    * ``skip_bad_images``: a row whose image (or paired image) cannot be decoded is replaced by the next
      readable row (of the same bucket), deterministically; ``bad`` counts the rows skipped.
    """

    def __init__(self, hf_dataset, image_column, caption_column, resolution, *, tokenize=None,
                 center_crop=False, random_flip=False, seed=0, skip_bad_images=False, name="the training data",
                 proportion_empty_prompts=0.0, interpolation=DEFAULT_INTERPOLATION, buckets=None,
                 paired_columns=None, derived=None):
        if not isinstance(resolution, int) or resolution < 1:
            raise UsageError(f"--resolution must be a positive integer (got {resolution!r})")
        if interpolation not in INTERPOLATIONS:
            raise UsageError(f"--image_interpolation_mode: unknown mode {interpolation!r}; expected one of "
                             f"{', '.join(sorted(INTERPOLATIONS))}")
        self.paired = dict(paired_columns or {})
        self.derived = dict(derived or {})
        for key, kind in self.derived.items():
            if kind not in DERIVED_CONDITIONING:
                raise UsageError(f"derived conditioning {kind!r} for {key!r}: expected one of "
                                 f"{', '.join(DERIVED_CONDITIONING)}")
        columns = list(getattr(hf_dataset, "column_names", []) or [])
        for col in [image_column, caption_column, *self.paired.values()]:
            if columns and col is not None and col not in columns:
                raise DataError(f"{name}: no column {col!r}; the data set has columns: {', '.join(columns)}")
        self.ds = undecoded(hf_dataset, [image_column, *self.paired.values()])
        self.image_column = image_column
        self.caption_column = caption_column
        self.resolution = resolution
        self.tokenize_fn = tokenize
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.name = name
        self.p_empty = proportion_empty_prompts
        self.interpolation = interpolation
        if buckets is not None and not isinstance(buckets, Buckets):
            buckets = Buckets(list(buckets), None)  # sizes only: every row may stand in for another
        if buckets is not None and buckets.of_row is not None and len(buckets.of_row) != len(hf_dataset):
            raise ValueError(f"buckets cover {len(buckets.of_row)} rows, the data set has {len(hf_dataset)}")
        self.buckets = buckets

    def __len__(self):
        return len(self.ds)

    # -------------------------------------------------------------------------------------------- pieces
    def where(self, index: int, column) -> str:
        return f"row {index} of {self.name} (column {column!r})"

    def target_size(self, index: int, bucket: int | None = None) -> tuple[int, int]:
        if self.buckets is None:
            return self.resolution, self.resolution
        if bucket is None:
            if self.buckets.of_row is None:
                raise ValueError("a key without a bucket id, and no bucket per row is known")
            bucket = self.buckets.of_row[index]
        return tuple(self.buckets.sizes[bucket])

    def flip_for(self, epoch: int, index: int) -> bool:
        return self.random_flip and sample_rng(self.seed, epoch, index, "flip").random() < 0.5

    def caption(self, epoch: int, index: int, row=None) -> str:
        row = self.ds[index] if row is None else row
        return choose_caption(row[self.caption_column], sample_rng(self.seed, epoch, index, "caption"),
                              self.where(index, self.caption_column))

    def decode(self, index: int, row=None) -> dict:
        """The row's images as RGB PIL images: ``{"pixel_values": image, <paired key>: image, ...}``."""
        row = self.ds[index] if row is None else row
        out = {"pixel_values": load_pil(row[self.image_column], self.where(index, self.image_column))}
        for key, col in self.paired.items():
            out[key] = load_pil(row[col], self.where(index, col))
        return out

    def transform(self, images: dict, target_hw, center_crop: bool, flip: bool, rng) -> dict:
        """Resize/crop/flip the decoded images alike; tensors plus the SDXL size fields."""
        img, (top, left), orig = resize_crop(images["pixel_values"], target_hw, center_crop, rng,
                                             self.interpolation, flip=flip)
        out = {"pixel_values": to_tensor(img)}
        if self.paired:
            th, tw = target_hw
            cover_h, cover_w = covering_size(orig, target_hw)
            raw_left = cover_w - left - tw if flip else left  # `left` is mirrored after a flip; undo that
            for key in self.paired:
                p = images[key]
                if p.size != (cover_w, cover_h):
                    p = p.resize((cover_w, cover_h), INTERPOLATIONS[self.interpolation])
                p = p.crop((raw_left, top, raw_left + tw, top + th))
                if flip:
                    p = p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                out[key] = to_tensor(p, unit=True)
        for key, kind in self.derived.items():
            out[key] = derive_conditioning(out["pixel_values"], kind)
        out["original_size"] = torch.tensor(orig, dtype=torch.long)
        out["crop_top_left"] = torch.tensor((top, left), dtype=torch.long)
        out["target_size"] = torch.tensor(tuple(target_hw), dtype=torch.long)
        return out

    # ------------------------------------------------------------------------------------------ examples
    def _example(self, epoch: int, index: int, bucket: int | None, row=None, images=None) -> dict:
        row = self.ds[index] if row is None else row
        images = self.decode(index, row) if images is None else images
        rng = sample_rng(self.seed, epoch, index, "crop")
        out = self.transform(images, self.target_size(index, bucket), self.center_crop,
                             self.flip_for(epoch, index), rng)
        if self.caption_column is not None:
            cap = self.caption(epoch, index, row)
            if self.p_empty and sample_rng(self.seed, epoch, index, "empty").random() < self.p_empty:
                cap = ""  # caption dropout teaches the unconditional prediction classifier-free guidance uses
            out["caption"] = cap
            if self.tokenize_fn is not None:
                out.update(self.tokenize_fn(cap))
        out.update(index=index, epoch=epoch, bad=0)
        return out

    def candidates(self, index: int, bucket: int | None):
        """Rows that may stand in for ``index`` under --skip_bad_images, in order: itself, then the next rows
        (wrapping), of the same bucket when rows have buckets."""
        n = len(self.ds)
        of_row = self.buckets.of_row if self.buckets is not None else None
        want = bucket if bucket is not None else (of_row[index] if of_row is not None else None)
        for step in range(n):
            j = (index + step) % n
            if want is None or of_row is None or of_row[j] == want:
                yield j

    def __getitem__(self, key):
        epoch, index, bucket = parse_key(key)
        if not self.skip_bad_images:
            return self._example(epoch, index, bucket)
        for skipped, j in enumerate(self.candidates(index, bucket)):
            row = self.ds[j]
            try:
                images = self.decode(j, row)
            except DataError as e:  # only undecodable images are skipped; a bad caption is still an error
                if skipped == 0:
                    logger.warning("skipping %s", e)
                continue
            ex = self._example(epoch, j, bucket, row, images)
            ex["bad"] = skipped
            return ex
        raise DataError(f"--skip_bad_images: no readable image in {self.name}"
                        + (f" (bucket {bucket})" if bucket is not None else ""))


def collate(examples: list[dict]) -> dict:
    """Stack the tensor fields; ``caption`` stays a list, ``bad`` is a python int (the batch's sum),
    ``index`` and ``epoch`` become LongTensors."""
    batch = {"index": torch.tensor([int(e["index"]) for e in examples]),
             "epoch": torch.tensor([int(e.get("epoch", 0)) for e in examples]),
             "bad": int(sum(int(e.get("bad", 0)) for e in examples))}
    for key, value in examples[0].items():
        if key in batch:
            continue
        if isinstance(value, torch.Tensor):
            try:
                batch[key] = torch.stack([e[key] for e in examples])
            except RuntimeError as err:
                shapes = sorted({tuple(e[key].shape) for e in examples})
                raise ValueError(f"collate: {key!r} has shapes {shapes} in one batch (rows of different "
                                 f"aspect-ratio buckets? batch them with BucketBatchSampler)") from err
        elif key == "caption":
            batch[key] = [e[key] for e in examples]
    return batch


__all__ = ["ClipTokenize", "ImageCaptionDataset", "caption_options", "choose_caption",
           "collate", "epoch_permutation", "image_transform", "load_pil", "parse_key", "sample_rng", "undecoded"]
