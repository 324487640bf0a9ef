"""On-disk cache of VAE latents and text-encoder outputs (``--cache_latents``).

Per row the cache stores the VAE posterior's mean and std (not one sample of it), so training from the cache
draws fresh latents each step exactly as the online path does; with ``--random_flip`` both orientations are
cached. Crops are deterministic in cached mode: a center crop to the row's bucket (or the square), whose
``original_size`` and ``crop_top_left`` (per orientation) are stored for SDXL's time ids. Text outputs are
stored once per distinct caption (``encode_prompts`` decides what they are: ``encoder_hidden_states`` for
SD, prompt and pooled embeddings for SDXL); a list-of-captions row keeps all of its options and the data set
picks one per (seed, epoch, index) as online.

The key hashes everything the tensors depend on: what the task passes (model files, tokenizers:
:func:`model_key_parts`), the data set (fingerprint, rows, columns), resolution, interpolation, flip and the
bucket sizes and assignment. Change any and a new cache is built; the old one stays until removed. Writes are
atomic (temp file, fsync, rename); ``cache.pt`` appears only when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from ..errors import DataError
from ..fsutil import fsync_file, write_json_atomic
from .dataset import ImageCaptionDataset, caption_options, parse_key, sample_rng

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
CACHE_FILE = "cache.pt"


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


def _caption_column(ds, column) -> list:
    if hasattr(ds, "select_columns"):
        return list(ds.select_columns([column])[column])
    return [ds[i][column] for i in range(len(ds))]


# ------------------------------------------------------------------------------------------------ the cache
class LatentCache:
    """A built cache, loaded. Per bucket ``b``: ``moments_by_bucket[b]`` [n_b, F, 2C, h_b, w_b] (F = 2
    orientations with flip, else 1). Per row: ``row_bucket``, ``row_pos`` (position in its bucket, -1: the
    image could not be read), ``original_size`` [N, 2], ``crop_top_left`` [N, F, 2]. Text: ``text`` {field:
    [U, ...]} for the distinct ``captions``; ``row_captions`` per row (None without a caption column)."""

    def __init__(self, folder: str):
        path = os.path.join(folder, CACHE_FILE)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise DataError(f"latent cache {folder} has no {CACHE_FILE} (was it built? is the cache folder "
                            f"shared by every process?)") from e
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise DataError(f"latent cache {path} was written by another version; delete the folder")
        self.folder = folder
        self.moments_by_bucket = data["moments"]
        self.row_bucket = data["row_bucket"]
        self.row_pos = data["row_pos"]
        self.original_size = data["original_size"]
        self.crop_top_left = data["crop_top_left"]
        self.target_sizes = data["target_sizes"]
        self.bucketed = bool(data["bucketed"])
        self.captions = data["captions"]
        self.row_captions = data["row_captions"]
        self.text = data["text"]
        self.caption_ids = {c: i for i, c in enumerate(self.captions)}
        self.num_flips = int(self.crop_top_left.shape[1])
        self.hit = None
        # Pre-bucket views (one square bucket, every row readable): moments [N, F, 2C, h, w], SD text states.
        single = len(self.moments_by_bucket) == 1 and bool((self.row_pos >= 0).all())
        self.moments = self.moments_by_bucket[0] if single else None
        self.text_states = self.text.get("encoder_hidden_states")

    def __len__(self) -> int:
        return int(self.row_bucket.shape[0])

    def good(self, index: int) -> bool:
        return int(self.row_pos[index]) >= 0

    def moments_of(self, index: int, flip: bool) -> torch.Tensor:
        b, p = int(self.row_bucket[index]), int(self.row_pos[index])
        return self.moments_by_bucket[b][p, 1 if flip else 0]

    # ------------------------------------------------------------------------------------------- build
    @staticmethod
    def create(folder: str, parts: dict, dataset: ImageCaptionDataset, encode_images, encode_prompts,
               random_flip: bool, progress: bool = True, batch_size: int = 16) -> "LatentCache":
        """Encode every row of ``dataset`` (center crop, both orientations with ``random_flip``) into
        ``folder``. Unreadable images are an error, or with the data set's ``skip_bad_images`` left out."""
        from tqdm.auto import tqdm

        if dataset.paired or dataset.derived:
            raise ValueError("the latent cache holds no paired or derived images; train such tasks online")
        n = len(dataset)
        flips = (False, True) if random_flip else (False,)
        if dataset.buckets is not None:
            if dataset.buckets.of_row is None:
                raise ValueError("caching with buckets needs the bucket of every row (Buckets.of_row)")
            sizes, of_row = [tuple(s) for s in dataset.buckets.sizes], list(dataset.buckets.of_row)
        else:
            sizes, of_row = [(dataset.resolution, dataset.resolution)], [0] * n
        row_pos = torch.full((n,), -1, dtype=torch.long)
        original = torch.zeros(n, 2, dtype=torch.long)
        crops = torch.zeros(n, len(flips), 2, dtype=torch.long)
        moments, bad = [], 0
        bar = tqdm(total=n, desc="caching latents", unit="image", disable=not progress)
        for b, size in enumerate(sizes):
            rows = [i for i in range(n) if of_row[i] == b]
            chunks, pos = [], 0
            for start in range(0, len(rows), batch_size):
                decoded = []
                for i in rows[start:start + batch_size]:
                    try:
                        decoded.append((i, dataset.decode(i)))
                    except DataError as e:
                        if not dataset.skip_bad_images:
                            raise
                        bad += 1
                        logger.warning("latent cache: skipping %s", e)
                if decoded:
                    chunks.append(_encode_chunk(dataset, decoded, size, flips, encode_images, original, crops))
                    for i, _ in decoded:
                        row_pos[i] = pos
                        pos += 1
                bar.update(len(rows[start:start + batch_size]))
            moments.append(torch.cat(chunks) if chunks else torch.zeros(0))
        bar.close()
        if bad:
            logger.warning("latent cache: %d unreadable image(s) left out (--skip_bad_images)", bad)
        if not (row_pos >= 0).any():
            raise DataError(f"latent cache: no readable image in {dataset.name}")
        captions, row_captions, text = [], None, {}
        if dataset.caption_column is not None:
            values = _caption_column(dataset.ds, dataset.caption_column)
            row_captions = [caption_options(v, dataset.where(i, dataset.caption_column))
                            for i, v in enumerate(values)]
            captions = sorted({c for opts in row_captions for c in opts})
            text = _encode_captions(captions, encode_prompts, progress)
        data = {"format": CACHE_FORMAT, "moments": moments, "row_bucket": torch.tensor(of_row, dtype=torch.long),
                "row_pos": row_pos, "original_size": original, "crop_top_left": crops,
                "target_sizes": torch.tensor(sizes, dtype=torch.long), "bucketed": dataset.buckets is not None,
                "captions": captions, "row_captions": row_captions, "text": text}
        os.makedirs(folder, exist_ok=True)
        write_json_atomic(os.path.join(folder, "key.json"), parts)
        tmp = os.path.join(folder, f"{CACHE_FILE}.tmp-{os.getpid()}")
        try:
            torch.save(data, tmp)
            fsync_file(tmp)
            os.replace(tmp, os.path.join(folder, CACHE_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return LatentCache(folder)

    @staticmethod
    def load_or_build(root: str, key_parts: dict, dataset: ImageCaptionDataset, encode_images, encode_prompts,
                      random_flip: bool, progress: bool = True, is_main: bool = True,
                      wait_fn=None) -> "LatentCache":
        """The cache for (``key_parts``, ``dataset``, ``random_flip``) under ``root``: loaded if it exists,
        else built by the main process (``is_main``: the process that may write ``root``; per node when
        ``root`` is node-local) while the others wait in ``wait_fn`` (a barrier every process calls).
        ``encode_images`` / ``encode_prompts`` are only called when building."""
        parts = {"task": key_parts, "data": dataset_key_parts(dataset, random_flip), "format": CACHE_FORMAT}
        folder = os.path.join(root, key_hash(parts))
        hit = os.path.isfile(os.path.join(folder, CACHE_FILE))
        if not hit and is_main:
            LatentCache.create(folder, parts, dataset, encode_images, encode_prompts, random_flip, progress)
        if wait_fn is not None:
            wait_fn()
        logger.info("latent cache %s: %s", "hit" if hit else "built", folder)
        cache = LatentCache(folder)
        cache.hit = hit
        return cache


def _encode_chunk(dataset, decoded, size, flips, encode_images, original, crops) -> torch.Tensor:
    """[len(decoded), F, 2C, h, w] for rows decoded together; fills their original size and crops."""
    per_flip = []
    for f, flip in enumerate(flips):
        pixels = []
        for i, images in decoded:
            t = dataset.transform(images, size, True, flip, None)
            pixels.append(t["pixel_values"])
            original[i] = t["original_size"]
            crops[i, f] = t["crop_top_left"]
        m = encode_images(torch.stack(pixels))
        if m.shape[0] != len(decoded):
            raise ValueError(f"encode_images returned {m.shape[0]} rows for {len(decoded)} images")
        per_flip.append(m.detach().float().cpu())
    return torch.stack(per_flip, dim=1)


def _encode_captions(captions: list, encode_prompts, progress: bool, batch: int = 64) -> dict:
    from tqdm.auto import tqdm

    parts: dict = {}
    for start in tqdm(range(0, len(captions), batch), desc="caching text", disable=not progress):
        chunk = captions[start:start + batch]
        for key, value in encode_prompts(chunk).items():
            if value.shape[0] != len(chunk):
                raise ValueError(f"encode_prompts returned {value.shape[0]} rows of {key!r} for {len(chunk)} "
                                 f"captions")
            value = value.detach().cpu()
            parts.setdefault(key, []).append(value.float() if value.is_floating_point() else value)
    return {k: torch.cat(v) for k, v in parts.items()}


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
        if proportion_empty_prompts and empty_prompt is None and cache.row_captions is not None:
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
        out = {"latent_moments": c.moments_of(j, flip), "original_size": c.original_size[j],
               "crop_top_left": c.crop_top_left[j, 1 if flip else 0],
               "target_size": c.target_sizes[int(c.row_bucket[j])]}
        if c.row_captions is not None:
            opts = c.row_captions[j]
            # The same draws as the online path: choose_caption then caption dropout, each on its own stream.
            cap = opts[sample_rng(self.seed, epoch, j, "caption").randrange(len(opts))] if len(opts) > 1 \
                else opts[0]
            if self.p_empty and sample_rng(self.seed, epoch, j, "empty").random() < self.p_empty:
                out.update(self.empty_prompt)
                cap = ""
            else:
                cid = c.caption_ids[cap]
                out.update({k: v[cid] for k, v in c.text.items()})
            out["caption"] = cap
        out.update(index=j, epoch=epoch, bad=bad)
        return out


__all__ = ["CACHE_FORMAT", "CachedDataset", "LatentCache", "clip_prompts_fn", "dataset_key_parts",
           "files_signature", "key_hash", "model_key_parts", "vae_moments_fn"]
