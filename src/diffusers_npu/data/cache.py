"""On-disk cache of VAE latents and text-encoder outputs (``--cache_latents``), sharded and read as needed.

Per row the cache stores the VAE posterior's mean and std (not one sample of it), so training from the cache
draws fresh latents each step exactly as the online path does; with ``--random_flip`` both orientations are
cached. Crops are deterministic in cached mode: a center crop to the row's bucket (or the square), whose
``original_size`` and ``crop_top_left`` (per orientation) are stored for SDXL's time ids. Text outputs are
stored once per distinct caption of a shard (``encode_prompts`` decides what they are: ``encoder_hidden_states``
for SD, prompt and pooled embeddings for SDXL, any dict of tensors of any shapes for other encoders); a
list-of-captions row keeps all of its options and the data set picks one per (seed, epoch, index) as online.

Layout of a cache folder (:mod:`.cache_build` writes it, every rank a share of the shards):
``shard-NNNNN.safetensors`` (rows of one bucket: moments, sizes, crops, the shard's captions and their
encoder outputs), ``rows.safetensors`` (shard and position of every row), ``index.json`` (written last: the
cache is complete only when it exists; it lists every shard with its sha256). A process reads only the rows
of its own batches, with ``pread`` (:mod:`.shards`), so its memory does not grow with the number of rows.
On load every shard's checksum is checked (shards spread over the ranks); a damaged one is deleted with one
warning line and built again, never trusted.

The key hashes everything the tensors depend on: what the task passes (model files, tokenizers:
:func:`model_key_parts`), the data set (fingerprint, rows, columns), resolution, interpolation, flip and the
bucket sizes and assignment. Change any and a new cache is built; the old one stays until removed. Writes are
atomic (temp file, fsync, rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from ..errors import DataError
from .cache_build import INDEX_FILE, ROWS_FILE, build, shard_name, sidecar_name
from .dataset import ImageCaptionDataset, parse_key, sample_rng
from .shards import ShardReader, file_sha256

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 3: sharded (2: one cache.pt, read whole by every process)
OPEN_SHARDS = 16  # shard files a process keeps open (their small per-row tables in memory)


# ------------------------------------------------------------------------------------------------ the key
def files_signature(folder: str) -> list:
    """[relative path, size, mtime_ns] of every file under ``folder`` (ns: a same-second rewrite counts)."""
    sig = []
    if folder and os.path.isdir(folder):
        for root, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                p = os.path.join(root, f)
                st = os.stat(p)
                sig.append([os.path.relpath(p, folder), st.st_size, st.st_mtime_ns])
    return sig


_files_signature = files_signature  # the name earlier callers import


def model_key_parts(model_path: str, components=("vae", "text_encoder", "tokenizer")) -> dict:
    """Key parts for a diffusers model folder: its path and the file signature of each named component
    (SDXL: add ``text_encoder_2`` and ``tokenizer_2``)."""
    local = os.path.exists(model_path)
    parts = {"model": os.path.abspath(model_path) if local else model_path}
    for name in components:
        parts[name] = files_signature(os.path.join(model_path, name)) if local else None
    return parts


def _fingerprint(ds) -> str:
    fp = getattr(ds, "_fingerprint", None)
    if fp:
        return fp
    logger.warning("latent cache: the data set has no fingerprint; the cache key sees only its length")
    return f"rows:{len(ds)}"


def dataset_key_parts(dataset: ImageCaptionDataset, random_flip: bool) -> dict:
    """What the cached tensors take from the data set and its transforms."""
    b = dataset.buckets
    of_row = hashlib.sha256(json.dumps(list(b.of_row)).encode()).hexdigest() if b and b.of_row else None
    return {"dataset": _fingerprint(dataset.ds), "rows": len(dataset), "columns": [
        dataset.image_column, dataset.caption_column], "resolution": dataset.resolution,
        "interpolation": dataset.interpolation, "crop": "center", "random_flip": bool(random_flip),
        "buckets": [list(s) for s in b.sizes] if b else None, "bucket_of_row": of_row,
        # A cache built with --skip_bad_images has left rows out; without the flag they must be an error again.
        "skip_bad_images": bool(dataset.skip_bad_images)}


def key_hash(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ encode helpers
def vae_moments_fn(vae, device, dtype):
    """``encode_images`` for a diffusers ``AutoencoderKL``: posterior mean and std concatenated (float32 CPU)."""
    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).float().cpu()
    return encode


def clip_prompts_fn(tokenizer, text_encoder, device):
    """``encode_prompts`` for Stable Diffusion 1.x/2.x: ``{"encoder_hidden_states": [N, L, D]}``."""
    @torch.no_grad()
    def encode(captions: list) -> dict:
        ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
        return {"encoder_hidden_states": text_encoder(ids.to(device))[0].float().cpu()}
    return encode


# ------------------------------------------------------------------------------------------------ the cache
class LatentCache:
    """A built cache, opened for reading (nothing but the index and the row map is read up front).

    Per row: ``row_bucket`` (-1: no bucket), ``row_shard`` and ``row_pos`` (-1: the image could not be read);
    :meth:`moments_of`, :meth:`original_size_of`, :meth:`crop_of`, :meth:`captions_of` and :meth:`text_of` read
    one row from its shard. ``target_sizes`` [B, 2]; ``num_flips`` (2 with flips, else 1)."""

    def __init__(self, folder: str):
        path = os.path.join(folder, INDEX_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
        except FileNotFoundError as e:
            raise DataError(f"latent cache {folder} has no {INDEX_FILE} (was it built? is the cache folder "
                            f"shared by every process?)") from e
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            raise DataError(f"latent cache {path} was written by another version; delete the folder")
        self.folder = folder
        self.index = index
        rows = ShardReader(os.path.join(folder, index["rows_file"]["file"]))
        try:
            self.row_shard = rows.tensor("row_shard").long()
            self.row_pos = rows.tensor("row_pos").long()
            self.row_bucket = rows.tensor("row_bucket").long()
        finally:
            rows.close()
        self.shards = index["shards"]
        self.target_sizes = torch.tensor(index["target_sizes"], dtype=torch.long)
        self.bucketed = bool(index["bucketed"])
        self.has_text = bool(index["has_text"])
        self.num_flips = int(index["num_flips"])
        self.hit = None
        self._open: dict = {}  # shard id -> (reader, its small tables); at most OPEN_SHARDS, oldest closed

    def __len__(self) -> int:
        return int(self.row_bucket.shape[0])

    def __getstate__(self):  # loader workers open their own files
        return {**self.__dict__, "_open": {}}

    def good(self, index: int) -> bool:
        return int(self.row_pos[index]) >= 0

    def _shard(self, index: int):
        s = int(self.row_shard[index])
        if s in self._open:
            self._open[s] = self._open.pop(s)  # most recently used last
            return self._open[s]
        reader = ShardReader(os.path.join(self.folder, self.shards[s]["file"]))
        tables = {"original_size": reader.tensor("original_size"), "crop_top_left": reader.tensor("crop_top_left")}
        if self.has_text:
            raw = reader.tensor("caption_bytes").numpy().tobytes()
            offsets = reader.tensor("caption_offsets").tolist()
            tables["captions"] = [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
            tables["row_offsets"] = reader.tensor("row_caption_offsets").tolist()
            tables["row_ids"] = reader.tensor("row_caption_ids").tolist()
        if len(self._open) >= OPEN_SHARDS:
            self._open.pop(next(iter(self._open)))[0].close()
        self._open[s] = (reader, tables)
        return self._open[s]

    def moments_of(self, index: int, flip: bool) -> torch.Tensor:
        """[2C, h, w]: the posterior's mean and std of row ``index`` (mirrored crop with ``flip``)."""
        reader, _ = self._shard(index)
        return reader.row("moments", int(self.row_pos[index]), 1 if flip else 0)

    def original_size_of(self, index: int) -> torch.Tensor:
        return self._shard(index)[1]["original_size"][int(self.row_pos[index])]

    def crop_of(self, index: int, flip: bool) -> torch.Tensor:
        return self._shard(index)[1]["crop_top_left"][int(self.row_pos[index]), 1 if flip else 0]

    def captions_of(self, index: int) -> list:
        """The row's caption options (in the order of its cell)."""
        t = self._shard(index)[1]
        p = int(self.row_pos[index])
        return [t["captions"][i] for i in t["row_ids"][t["row_offsets"][p]:t["row_offsets"][p + 1]]]

    def text_of(self, index: int, option: int) -> dict:
        """The encoder outputs of the row's caption option ``option``: ``{field: tensor}``."""
        reader, t = self._shard(index)
        p = int(self.row_pos[index])
        cid = t["row_ids"][t["row_offsets"][p] + option]
        return {name[5:]: reader.row(name, cid) for name in reader.entries if name.startswith("text.")}

    def stacked_moments(self) -> torch.Tensor:
        """[N, F, 2C, h, w] of a one-bucket cache whose rows were all readable, read whole (for small checks)."""
        if len(self.target_sizes) != 1 or not bool((self.row_pos >= 0).all()):
            raise ValueError("stacked_moments needs one bucket and every row readable")
        return torch.stack([torch.stack([self.moments_of(i, f) for f in [False, True][:self.num_flips]])
                            for i in range(len(self))])

    # ------------------------------------------------------------------------------- load, check, build
    @staticmethod
    def load_or_build(root: str, key_parts: dict, dataset: ImageCaptionDataset, encode_images, encode_prompts,
                      random_flip: bool, progress: bool = True, rank: int = 0, world_size: int = 1, barrier=None,
                      rows_per_shard: int | None = None) -> "LatentCache":
        """The cache for (``key_parts``, ``dataset``, ``random_flip``) under ``root``, checked, and built or
        repaired where needed. Every process calls it (``barrier``: a barrier over all of them; the folder must
        be one every process sees): the shards' checksums are checked in parallel, then missing or damaged
        shards are encoded by all ranks (:func:`.cache_build.build`) and global main writes the index.
        ``encode_images`` / ``encode_prompts`` are only called when something is built."""
        barrier = barrier or (lambda: None)
        parts = {"task": key_parts, "data": dataset_key_parts(dataset, random_flip), "format": CACHE_FORMAT}
        folder = os.path.join(root, key_hash(parts))
        complete = os.path.isfile(os.path.join(folder, INDEX_FILE))
        if complete:
            check_shards(folder, rank, world_size)
        barrier()
        if complete:
            complete = _all_present(folder)
        if not complete:
            build(folder, parts, dataset, encode_images, encode_prompts, random_flip, rank=rank,
                  world_size=world_size, barrier=barrier, progress=progress, rows_per_shard=rows_per_shard)
        logger.info("latent cache %s: %s", "hit" if complete else "built", folder)
        cache = LatentCache(folder)
        cache.hit = complete
        return cache


def check_shards(folder: str, rank: int = 0, world_size: int = 1) -> list:
    """Check this rank's share of the shards (and, on rank 0, the row map) against the index's size and
    sha256. A damaged file is deleted with its sidecar, with one warning line, so that the build makes it again.
    Returns the names of the files deleted."""
    with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != CACHE_FORMAT:
        raise DataError(f"latent cache {folder} was written by another version; delete the folder")
    files = [(s, e) for s, e in enumerate(index["shards"]) if s % world_size == rank]
    if rank == 0:
        files.append((None, index["rows_file"]))
    damaged = []
    for s, entry in files:
        path = os.path.join(folder, entry["file"])
        if not os.path.isfile(path):
            continue  # the build makes it
        if os.path.getsize(path) == entry["bytes"] and file_sha256(path) == entry["sha256"]:
            continue
        logger.warning("latent cache: %s does not match its checksum in %s (damaged); rebuilding it", path,
                       INDEX_FILE)
        os.remove(path)
        if s is not None and os.path.exists(os.path.join(folder, sidecar_name(s))):
            os.remove(os.path.join(folder, sidecar_name(s)))
        damaged.append(entry["file"])
    return damaged


def _all_present(folder: str) -> bool:
    try:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:  # global main is already repairing it
        return False
    return os.path.isfile(os.path.join(folder, ROWS_FILE)) and all(
        os.path.isfile(os.path.join(folder, shard_name(s))) and os.path.isfile(os.path.join(folder, sidecar_name(s)))
        for s in range(len(index["shards"])))


def encode_chunk(dataset, decoded, size, flips, encode_images, original, crops) -> torch.Tensor:
    """[len(decoded), F, 2C, h, w] for rows decoded together (``decoded``: (position, images)); fills their
    original size and crops at those positions."""
    per_flip = []
    for f, flip in enumerate(flips):
        pixels = []
        for k, images in decoded:
            t = dataset.transform(images, size, True, flip, None)
            pixels.append(t["pixel_values"])
            original[k] = t["original_size"]
            crops[k, f] = t["crop_top_left"]
        m = encode_images(torch.stack(pixels))
        if m.shape[0] != len(decoded):
            raise ValueError(f"encode_images returned {m.shape[0]} rows for {len(decoded)} images")
        per_flip.append(m.detach().float().cpu())
    return torch.stack(per_flip, dim=1)


# --------------------------------------------------------------------------------------------- the data set
class CachedDataset(torch.utils.data.Dataset):
    """Training examples from a :class:`LatentCache`, keyed like the online data set.

    Example: ``latent_moments`` [2C, h, w], the cached text fields (or ``empty_prompt``'s when the caption is
    dropped), ``caption``, ``original_size``, ``crop_top_left``, ``target_size``, ``index``, ``epoch``, ``bad``.
    A row left out of the cache (unreadable image) is replaced by the next cached row of its bucket, as
    --skip_bad_images does online. ``bucket_of_row`` feeds :class:`~.sampling.BucketBatchSampler` (None
    without buckets).
    """

    def __init__(self, cache: LatentCache, seed: int, random_flip: bool, proportion_empty_prompts: float = 0.0,
                 empty_prompt=None):
        if proportion_empty_prompts and empty_prompt is None and cache.has_text:
            raise ValueError("proportion_empty_prompts needs the empty prompt's text fields (empty_prompt)")
        if random_flip and cache.num_flips < 2:
            raise ValueError(f"latent cache {cache.folder} holds one orientation; it was built without flips")
        self.cache = cache
        self.seed = seed
        self.random_flip = random_flip
        self.p_empty = proportion_empty_prompts
        self.empty_prompt = empty_prompt
        self.bucket_of_row = cache.row_bucket.tolist() if cache.bucketed else None

    def __len__(self):
        return len(self.cache)

    def _stand_in(self, index: int) -> tuple[int, int]:
        c, n = self.cache, len(self.cache)
        want = int(c.row_bucket[index])
        skipped = 0
        for step in range(n):
            j = (index + step) % n
            if int(c.row_bucket[j]) != want:
                continue
            if c.good(j):
                return j, skipped
            skipped += 1
        raise DataError(f"latent cache {c.folder}: no readable image in bucket {want}")

    def __getitem__(self, key):
        epoch, index, bucket = parse_key(key)
        c = self.cache
        if bucket is not None and bucket != int(c.row_bucket[index]):
            raise ValueError(f"key {key}: row {index} is in bucket {int(c.row_bucket[index])}, not {bucket}")
        j, bad = self._stand_in(index)
        flip = self.random_flip and sample_rng(self.seed, epoch, j, "flip").random() < 0.5
        out = {"latent_moments": c.moments_of(j, flip), "original_size": c.original_size_of(j),
               "crop_top_left": c.crop_of(j, flip), "target_size": c.target_sizes[int(c.row_bucket[j])]}
        if c.has_text:
            opts = c.captions_of(j)
            # The same draws as the online path: choose_caption then caption dropout, each on its own stream.
            pick = sample_rng(self.seed, epoch, j, "caption").randrange(len(opts)) if len(opts) > 1 else 0
            cap = opts[pick]
            if self.p_empty and sample_rng(self.seed, epoch, j, "empty").random() < self.p_empty:
                out.update(self.empty_prompt)
                cap = ""
            else:
                out.update(c.text_of(j, pick))
            out["caption"] = cap
        out.update(index=j, epoch=epoch, bad=bad)
        return out


__all__ = ["CACHE_FORMAT", "CachedDataset", "LatentCache", "check_shards", "clip_prompts_fn", "dataset_key_parts",
           "encode_chunk", "files_signature", "key_hash", "model_key_parts", "vae_moments_fn"]
