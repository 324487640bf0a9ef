"""On-disk cache of VAE latents and text-encoder states (``--cache_latents``).

The cache stores, per sample, the VAE posterior's mean and std (not one sample of it), so training from the
cache draws fresh latents each step exactly as the online path does. With ``--random_flip`` both orientations
are cached. Text states are stored once per distinct caption; a list-of-captions row keeps all of its options
and the trainer picks one per (seed, epoch, index) as online. Crops are deterministic (center) in cached mode.

The key hashes everything the cached tensors depend on: model weights (file sizes and mtimes of the VAE and
text encoder), tokenizer, data set fingerprint and length, columns, resolution, crop and flip. Change any and a
new cache is built; the old one stays until removed. Writes are atomic (temp file, then rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from .dataset import choose_caption, image_transform, load_pil, sample_rng

logger = logging.getLogger(__name__)


def _files_signature(folder: str) -> list:
    sig = []
    if folder and os.path.isdir(folder):
        for root, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                p = os.path.join(root, f)
                st = os.stat(p)
                sig.append([os.path.relpath(p, folder), st.st_size, st.st_mtime_ns])  # ns: a same-second rewrite counts
    return sig


def cache_key(model_path: str, hf_dataset, image_column, caption_column, resolution, center_crop, random_flip,
              tokenizer=None) -> tuple[str, dict]:
    parts = {
        "model": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
        "vae": _files_signature(os.path.join(model_path, "vae")),
        "text_encoder": _files_signature(os.path.join(model_path, "text_encoder")),
        "tokenizer": _files_signature(os.path.join(model_path, "tokenizer")) or repr(tokenizer),
        "dataset": getattr(hf_dataset, "_fingerprint", None) or str(len(hf_dataset)),
        "rows": len(hf_dataset),
        "columns": [image_column, caption_column],
        "resolution": resolution,
        "center_crop": True,  # cached mode always center-crops (see module doc)
        "random_flip": bool(random_flip),
        "format": 1,
    }
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return h, parts


class LatentCache:
    """Holds latents [N, F, 2C, h, w] (F = 2 orientations with flip, else 1) and text states [U, L, D]."""

    def __init__(self, folder: str):
        self.folder = folder
        data = torch.load(os.path.join(folder, "cache.pt"), map_location="cpu", weights_only=True)
        self.moments = data["moments"]
        self.text_states = data["text_states"]
        self.caption_ids = {c: i for i, c in enumerate(data["captions"])}
        self.row_captions = data["row_captions"]  # per row: list of caption strings

    @staticmethod
    def build(folder: str, parts: dict, hf_dataset, image_column, caption_column, resolution, random_flip, vae,
              text_encoder, tokenizer, device, dtype, batch_size: int = 16, progress: bool = True) -> "LatentCache":
        from tqdm.auto import tqdm

        os.makedirs(folder, exist_ok=True)
        n = len(hf_dataset)
        flips = (False, True) if random_flip else (False,)
        rows = hf_dataset.select_columns([c for c in (image_column, caption_column) if c])
        moments, row_captions = [], []
        bar = tqdm(range(0, n, batch_size), desc="caching latents", disable=not progress)
        rng = sample_rng(0, 0, 0)  # unused with center crop; image_transform wants one
        with torch.no_grad():
            for start in bar:
                chunk = rows[start:start + batch_size]
                imgs = [load_pil(v, f"row {start + i} (column {image_column!r})")
                        for i, v in enumerate(chunk[image_column])]
                per_flip = []
                for fl in flips:
                    px = torch.stack([image_transform(im, resolution, True, fl, rng) for im in imgs])
                    dist = vae.encode(px.to(device, dtype)).latent_dist
                    per_flip.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
                moments.append(torch.stack(per_flip, dim=1))
                if caption_column:
                    for i, v in enumerate(chunk[caption_column]):
                        if isinstance(v, str):
                            row_captions.append([v])
                        else:
                            choose_caption(v, rng, f"row {start + i} (column {caption_column!r})")  # validates
                            row_captions.append(list(v))
        captions = sorted({c for opts in row_captions for c in opts})
        states = []
        with torch.no_grad():
            for start in tqdm(range(0, len(captions), 64), desc="caching text", disable=not progress):
                ids = tokenizer(captions[start:start + 64], max_length=tokenizer.model_max_length,
                                padding="max_length", truncation=True, return_tensors="pt").input_ids
                states.append(text_encoder(ids.to(device))[0].float().cpu())
        data = {"moments": torch.cat(moments), "captions": captions, "row_captions": row_captions,
                "text_states": torch.cat(states) if states else torch.zeros(0)}
        tmp = os.path.join(folder, f"cache.pt.tmp-{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, os.path.join(folder, "cache.pt"))
        with open(os.path.join(folder, "key.json"), "w") as f:
            json.dump(parts, f, indent=1)
        return LatentCache(folder)

    @staticmethod
    def load_or_build(root: str, model_path: str, hf_dataset, image_column, caption_column, resolution,
                      random_flip, encoders_fn, tokenizer, progress=True, is_main=True, wait_fn=None):
        """``encoders_fn()`` -> (vae, text_encoder, device, dtype), called only when the cache must be built."""
        key, parts = cache_key(model_path, hf_dataset, image_column, caption_column, resolution, True,
                               random_flip, tokenizer)
        folder = os.path.join(root, key)
        hit = os.path.isfile(os.path.join(folder, "cache.pt"))
        if not hit and is_main:
            vae, te, device, dtype = encoders_fn()
            LatentCache.build(folder, parts, hf_dataset, image_column, caption_column, resolution, random_flip,
                              vae, te, tokenizer, device, dtype, progress=progress)
        if wait_fn:
            wait_fn()
        logger.info("latent cache %s: %s", "hit" if hit else "built", folder)
        cache = LatentCache(folder)
        cache.hit = hit
        return cache


class CachedDataset(torch.utils.data.Dataset):
    """Training examples from a :class:`LatentCache`, keyed by ``(epoch, index)`` like the online data set."""

    def __init__(self, cache: LatentCache, seed: int, random_flip: bool, proportion_empty_prompts: float = 0.0,
                 empty_state=None):
        self.cache = cache
        self.seed = seed
        self.random_flip = random_flip
        self.p_empty = proportion_empty_prompts
        self.empty_state = empty_state

    def __len__(self):
        return self.cache.moments.shape[0]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        flip = self.random_flip and sample_rng(self.seed, epoch, index, "flip").random() < 0.5
        mom = self.cache.moments[index, 1 if flip else 0]
        opts = self.cache.row_captions[index]
        cap = opts[sample_rng(self.seed, epoch, index, "caption").randrange(len(opts))] if len(opts) > 1 else opts[0]
        if self.p_empty and sample_rng(self.seed, epoch, index, "empty").random() < self.p_empty:
            state = self.empty_state
        else:
            state = self.cache.text_states[self.cache.caption_ids[cap]]
        return {"latent_moments": mom, "encoder_hidden_states": state, "index": index, "epoch": epoch, "bad": 0,
                "caption": cap}
