"""Aspect-ratio buckets (as kohya's sd-scripts and SimpleTuner do them).

Real data sets are not square. Instead of cropping every image to ``resolution x resolution``, the images
are grouped by aspect ratio into *buckets*: sizes ``(h, w)`` of about ``resolution**2`` pixels, both sides
multiples of ``multiple``. Each image is resized to cover its bucket and cropped to it (losing far less than
a square crop would), and each global batch is drawn from one bucket (:class:`~.sampling.BucketBatchSampler`)
so tensors stack.

``multiple`` must be the model's total downsampling: the VAE factor times the UNet's (2 ** (number of UNet
down blocks - 1)); 8 x 8 = 64 for Stable Diffusion. A side that is not a multiple of it cannot go through the
UNet's skip connections.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple, Sequence

import numpy as np

from ..errors import DataError, UsageError
from .images import _source_name, open_image

logger = logging.getLogger(__name__)

DEFAULT_MAX_RATIO = 2.0


class Buckets(NamedTuple):
    """Bucket sizes and, per row of the data set, its bucket (-1: the image header could not be read)."""

    sizes: list  # [(h, w), ...]
    of_row: list  # [bucket id per row]

    def counts(self) -> list[int]:
        return np.bincount([b for b in self.of_row if b >= 0], minlength=len(self.sizes)).tolist()

    def describe(self) -> str:
        """One line for the log: ``32x32: 10 rows, 24x40: 5 rows, ...`` (h x w)."""
        return ", ".join(f"{h}x{w}: {n} rows" for (h, w), n in zip(self.sizes, self.counts()) if n)


def make_buckets(resolution: int, multiple: int = 64, max_ratio: float = DEFAULT_MAX_RATIO) -> list:
    """Bucket sizes ``(h, w)``, sorted from tallest to widest, each at most ``resolution**2`` pixels.

    For every width ``w`` (a multiple of ``multiple``) the bucket takes the largest height that keeps
    ``h * w <= resolution**2``; the transposed sizes are added so portrait and landscape are treated alike.
    Staying at or under the square's pixel count means a batch size that fits the square fits every bucket.
    ``max_ratio`` bounds the long side over the short side.
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise UsageError(f"aspect-ratio buckets: the size multiple must be a positive integer (got {multiple!r})")
    if max_ratio < 1:
        raise UsageError(f"aspect-ratio buckets: the largest aspect ratio must be >= 1 (got {max_ratio})")
    if resolution < multiple or resolution % multiple:
        raise UsageError(f"--resolution {resolution}: with aspect-ratio buckets it must be a multiple of "
                         f"{multiple} (the VAE x UNet downsampling of the model)")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(multiple, area // multiple + 1, multiple):
        h = (area // w) // multiple * multiple
        if h >= multiple and max(h, w) <= max_ratio * min(h, w):
            sizes.update({(h, w), (w, h)})
    return sorted(sizes, key=lambda s: (s[1] / s[0], s[1]))


def assign_buckets(sizes_hw: Sequence, buckets: Sequence) -> list[int]:
    """Per image size ``(h, w)``, the bucket with the closest log aspect ratio (ties: the first);
    ``None`` (an unreadable image) gets -1."""
    logs = np.log([h / w for h, w in buckets])
    out = []
    for size in sizes_hw:
        if size is None:
            out.append(-1)
            continue
        h, w = size
        out.append(int(np.argmin(np.abs(logs - math.log(h / w)))))
    return out


def _cells(rows, column):
    """Yield the image cells of ``column`` (a datasets.Dataset), or the items of a plain sequence of cells,
    without decoding images (datasets' Image feature is switched to raw bytes/paths)."""
    if column is None or not hasattr(rows, "column_names"):
        yield from rows
        return
    from datasets import Image as ImageFeature

    feature = rows.features.get(column)
    if isinstance(feature, ImageFeature) and feature.decode:
        rows = rows.cast_column(column, ImageFeature(decode=False))
    for batch in rows.select_columns([column]).iter(batch_size=512):
        yield from batch[column]


def image_sizes(rows, column: str | None = None, *, name: str = "the training data", skip_bad: bool = False,
                progress: bool = True) -> list:
    """``(h, w)`` of every image, from its header only (no pixels are decoded).

    ``rows`` is a ``datasets.Dataset`` (with ``column``) or a sequence of cells (paths, bytes, PIL images).
    An unreadable header is a :class:`DataError` naming the row and file, or with ``skip_bad`` a ``None``
    (logged). The progress bar appears only when this takes more than a couple of seconds.
    """
    from tqdm.auto import tqdm

    sizes, bad = [], 0
    bar = tqdm(total=len(rows), desc="reading image sizes", unit="image", delay=2.0, disable=not progress)
    try:
        for i, cell in enumerate(_cells(rows, column)):
            try:
                img = open_image(cell)
                w, h = img.size
                if img is not cell:
                    img.close()
                sizes.append((int(h), int(w)))
            except Exception as e:
                where = f"row {i} of {name}" + (f" (column {column!r})" if column else "")
                file = _source_name(cell)
                msg = f"cannot read image {where}{f' ({file})' if file else ''}: {type(e).__name__}: {e}"
                if not skip_bad:
                    raise DataError(msg) from e
                bad += 1
                if bad <= 3:
                    logger.warning("skipping %s", msg)
                sizes.append(None)
            bar.update(1)
    finally:
        bar.close()
    if bad:
        logger.warning("--skip_bad_images: %d unreadable image(s) left out of the aspect-ratio buckets", bad)
    return sizes


def bucketize(rows, column: str | None, resolution: int, multiple: int = 64,
              max_ratio: float = DEFAULT_MAX_RATIO, *, name: str = "the training data", skip_bad: bool = False,
              progress: bool = True) -> Buckets:
    """:func:`make_buckets` + :func:`image_sizes` + :func:`assign_buckets`; empty buckets are dropped."""
    return buckets_from_sizes(image_sizes(rows, column, name=name, skip_bad=skip_bad, progress=progress),
                              resolution, multiple, max_ratio, name=name)


def buckets_from_sizes(sizes_hw: Sequence, resolution: int, multiple: int = 64,
                       max_ratio: float = DEFAULT_MAX_RATIO, *, name: str = "the training data") -> Buckets:
    """:func:`make_buckets` + :func:`assign_buckets` for known image sizes (``None``: unreadable); empty
    buckets are dropped. Streaming data sets pass the sizes stored with the data."""
    sizes = make_buckets(resolution, multiple, max_ratio)
    of_row = assign_buckets(sizes_hw, sizes)
    used = sorted({b for b in of_row if b >= 0})
    if not used:
        raise DataError(f"{name}: no readable image to put in an aspect-ratio bucket")
    remap = {b: k for k, b in enumerate(used)}
    return Buckets([sizes[b] for b in used], [remap.get(b, -1) for b in of_row])


__all__ = ["DEFAULT_MAX_RATIO", "Buckets", "assign_buckets", "bucketize", "buckets_from_sizes", "image_sizes",
           "make_buckets"]
