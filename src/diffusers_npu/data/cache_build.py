"""Building the sharded latent cache: every rank encodes its share of the shards, global main writes the index.

The plan is a pure function of the data set's bucket assignment and ``rows_per_shard``: the rows of each
bucket, in row order, cut into shards of ``rows_per_shard`` rows (one shape per shard, so each tensor stacks).
Shard ``s`` is encoded by rank ``s % world_size``. A finished shard is its safetensors file plus a sidecar
``shard-NNNNN.json`` (checksum, size, rows left out) written after the file, so a build that was interrupted
(killed, an exception, a pre-emption) continues from its finished shards: only shards without a sidecar are
encoded again. ``rows_per_shard`` is fixed in ``plan.json`` on the first attempt (from one probe encoding, to
keep a shard near :data:`TARGET_SHARD_BYTES` whatever the encoders give per row), so a resumed build cuts the
rows the same way.

When every sidecar is there, global main writes ``rows.safetensors`` (shard and position of every row) and
then ``index.json``, which lists each shard with its checksum; the index appears only when the cache is
complete. With several nodes the cache folder must be on a file system every process sees: global main
checks that every shard arrived and says so if not.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ..errors import DataError
from ..fsutil import write_json_atomic
from .dataset import caption_options
from .shards import write_shard

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
ROWS_FILE = "rows.safetensors"
PLAN_FILE = "plan.json"
TARGET_SHARD_BYTES = 16 << 20  # the build holds one shard in memory (readers never do); many shards balance ranks
MAX_ROWS_PER_SHARD = 4096


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def sidecar_name(s: int) -> str:
    return f"shard-{s:05d}.json"


def layout(dataset, random_flip: bool):
    """(bucket sizes, bucket of every row as an int64 array, orientations) of what the cache holds."""
    if dataset.paired or dataset.derived:
        raise ValueError("the latent cache holds no paired or derived images; train such tasks online")
    if dataset.buckets is not None:
        if dataset.buckets.of_row is None:
            raise ValueError("caching with buckets needs the bucket of every row (Buckets.of_row)")
        sizes, of_row = [tuple(s) for s in dataset.buckets.sizes], np.asarray(dataset.buckets.of_row, np.int64)
    else:
        sizes, of_row = [(dataset.resolution, dataset.resolution)], np.zeros(len(dataset), np.int64)
    return sizes, of_row, ((False, True) if random_flip else (False,))


def plan_shards(of_row: np.ndarray, num_buckets: int, rows_per_shard: int) -> list:
    """[(bucket, row ids)] for every shard, bucket by bucket."""
    shards = []
    for b in range(num_buckets):
        rows = np.flatnonzero(of_row == b)
        shards += [(b, rows[i:i + rows_per_shard]) for i in range(0, len(rows), rows_per_shard)]
    return shards


def _probe_rows_per_shard(dataset, sizes, flips, encode_images, encode_prompts) -> int:
    h, w = max(sizes, key=lambda s: s[0] * s[1])
    per_row = encode_images(torch.zeros(1, 3, h, w)).float().nelement() * 4 * len(flips)
    if dataset.caption_column is not None:
        per_row += sum(v[0].nelement() * v.element_size() for v in encode_prompts(["probe"]).values())
    return int(max(8, min(MAX_ROWS_PER_SHARD, TARGET_SHARD_BYTES // max(per_row, 1))))


def _done(folder: str, s: int) -> bool:
    return os.path.isfile(os.path.join(folder, sidecar_name(s))) and os.path.isfile(os.path.join(folder,
                                                                                                 shard_name(s)))


def build(folder: str, parts: dict, dataset, encode_images, encode_prompts, random_flip: bool, *, rank: int = 0,
          world_size: int = 1, barrier=None, progress: bool = True, rows_per_shard: int | None = None,
          batch_size: int = 16) -> None:
    """Encode this rank's missing shards; global main (rank 0) writes the index. Every rank calls it."""
    from tqdm.auto import tqdm

    barrier = barrier or (lambda: None)
    sizes, of_row, flips = layout(dataset, random_flip)
    plan_path = os.path.join(folder, PLAN_FILE)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        write_json_atomic(os.path.join(folder, "key.json"), parts)
        if os.path.exists(os.path.join(folder, INDEX_FILE)):
            os.remove(os.path.join(folder, INDEX_FILE))  # being repaired: not complete until rewritten
        if not os.path.isfile(plan_path):
            k = rows_per_shard or _probe_rows_per_shard(dataset, sizes, flips, encode_images, encode_prompts)
            write_json_atomic(plan_path, {"rows_per_shard": k})
    barrier()
    with open(plan_path, encoding="utf-8") as f:
        k = int(json.load(f)["rows_per_shard"])
    shards = plan_shards(of_row, len(sizes), k)
    total = sum(len(r) for _, r in shards)
    mine = [s for s in range(len(shards)) if s % world_size == rank and not _done(folder, s)]

    def finished_rows() -> int:
        return sum(len(shards[s][1]) for s in range(len(shards)) if _done(folder, s))

    bar = tqdm(total=total, initial=finished_rows(), desc=f"caching latents ({world_size} process"
               f"{'es' if world_size > 1 else ''})", unit="image", disable=not (progress and rank == 0))
    try:
        for s in mine:
            b, rows = shards[s]
            _encode_shard(folder, s, rows, sizes[b], flips, dataset, encode_images, encode_prompts, batch_size,
                          bar)
            if not bar.disable:  # the whole job's progress (others' shards too), so the ETA is the job's
                bar.n = finished_rows()
                bar.refresh()
        barrier()
        if not bar.disable:
            bar.n = total
            bar.refresh()
    finally:
        bar.close()
    if rank == 0:
        write_index(folder, shards, sizes, of_row, flips, dataset)
    barrier()


def _encode_shard(folder, s, rows, size, flips, dataset, encode_images, encode_prompts, batch_size, bar):
    from .cache import encode_chunk

    n = len(rows)
    original = torch.zeros(n, 2, dtype=torch.long)
    crops = torch.zeros(n, len(flips), 2, dtype=torch.long)
    moments, good, bad, options = [], [], [], []
    for start in range(0, n, batch_size):
        decoded = []
        for k in range(start, min(n, start + batch_size)):
            i = int(rows[k])
            row = dataset.ds[i]
            try:
                decoded.append((k, dataset.decode(i, row)))
            except DataError as e:
                if not dataset.skip_bad_images:
                    raise
                bad.append(k)
                logger.warning("latent cache: skipping %s", e)
                continue
            if dataset.caption_column is not None:
                options.append(caption_options(row[dataset.caption_column],
                                               dataset.where(i, dataset.caption_column)))
        if decoded:
            moments.append(encode_chunk(dataset, decoded, size, flips, encode_images, original, crops))
            good += [k for k, _ in decoded]
        bar.update(min(n, start + batch_size) - start)
    tensors = {"row_ids": torch.as_tensor(np.asarray(rows)[good], dtype=torch.long),
               "original_size": original[good], "crop_top_left": crops[good],
               "moments": torch.cat(moments) if moments else torch.zeros(0)}
    if dataset.caption_column is not None:
        tensors.update(_text_tensors(options, encode_prompts))
    digest = write_shard(os.path.join(folder, shard_name(s)), tensors)
    write_json_atomic(os.path.join(folder, sidecar_name(s)), {**digest, "rows": n, "bad": bad})


def _text_tensors(options: list, encode_prompts, batch: int = 64) -> dict:
    """The shard's distinct captions (as UTF-8 bytes + offsets), each row's options as ids into them (CSR),
    and one encoder output per distinct caption (``text.<field>``: one tensor per field, any shape)."""
    captions = sorted({c for opts in options for c in opts})
    ids = {c: i for i, c in enumerate(captions)}
    encoded = [c.encode("utf-8") for c in captions]
    out = {"caption_bytes": torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8),
           "caption_offsets": torch.tensor(np.cumsum([0] + [len(e) for e in encoded]), dtype=torch.long),
           "row_caption_offsets": torch.tensor(np.cumsum([0] + [len(o) for o in options]), dtype=torch.long),
           "row_caption_ids": torch.tensor([ids[c] for o in options for c in o] or [0], dtype=torch.long)}
    fields: dict = {}
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        for key, value in encode_prompts(chunk).items():
            if value.shape[0] != len(chunk):
                raise ValueError(f"encode_prompts returned {value.shape[0]} rows of {key!r} for {len(chunk)} "
                                 f"captions")
            value = value.detach().cpu()
            fields.setdefault(key, []).append(value.float() if value.is_floating_point() else value)
    out.update({f"text.{k}": torch.cat(v) for k, v in fields.items()})
    return out


def write_index(folder, shards, sizes, of_row, flips, dataset) -> None:
    """Global main, after every rank's shards: the row map and the index (last: it marks the cache complete)."""
    missing = [shard_name(s) for s in range(len(shards)) if not _done(folder, s)]
    if missing:
        raise DataError(f"latent cache {folder}: {len(missing)} shard(s) missing after the build (e.g. "
                        f"{missing[0]}); with several nodes --cache_dir must be a folder every node shares")
    n = len(of_row)
    row_shard = np.full(n, -1, np.int32)
    row_pos = np.full(n, -1, np.int32)
    entries = []
    for s, (b, rows) in enumerate(shards):
        with open(os.path.join(folder, sidecar_name(s)), encoding="utf-8") as f:
            side = json.load(f)
        keep = np.ones(len(rows), bool)
        keep[side["bad"]] = False
        row_shard[rows[keep]] = s
        row_pos[rows[keep]] = np.arange(int(keep.sum()), dtype=np.int32)
        entries.append({"file": shard_name(s), "sha256": side["sha256"], "bytes": side["bytes"], "bucket": b,
                        "rows": len(rows), "good": int(keep.sum())})
    bad = int((row_pos < 0).sum() - (of_row < 0).sum())
    if bad:
        logger.warning("latent cache: %d unreadable image(s) left out (--skip_bad_images)", bad)
    if not (row_pos >= 0).any():
        raise DataError(f"latent cache: no readable image in {dataset.name}")
    digest = write_shard(os.path.join(folder, ROWS_FILE), {
        "row_shard": torch.from_numpy(row_shard), "row_pos": torch.from_numpy(row_pos),
        "row_bucket": torch.from_numpy(of_row)})
    from .cache import CACHE_FORMAT

    write_json_atomic(os.path.join(folder, INDEX_FILE), {
        "format": CACHE_FORMAT, "num_rows": n, "num_flips": len(flips), "target_sizes": [list(s) for s in sizes],
        "bucketed": dataset.buckets is not None, "has_text": dataset.caption_column is not None,
        "rows_file": {"file": ROWS_FILE, **digest}, "shards": entries})


__all__ = ["INDEX_FILE", "ROWS_FILE", "build", "layout", "plan_shards", "shard_name", "sidecar_name",
           "write_index"]
