"""The pre-bucket latent-cache calls (model objects instead of encode functions), as thin adapters.

Kept so that callers written before :mod:`.cache` took ``encode_images`` / ``encode_prompts`` keep working
until they switch; each builds an :class:`~.dataset.ImageCaptionDataset` (center crop, square) and calls the
new code, so there is one implementation of the cache.
"""
from __future__ import annotations

import os

from .cache import LatentCache, cache_key, clip_prompts_fn, dataset_key_parts, key_hash, vae_moments_fn
from .dataset import ImageCaptionDataset


def _square_dataset(hf_dataset, image_column, caption_column, resolution) -> ImageCaptionDataset:
    return ImageCaptionDataset(hf_dataset, image_column, caption_column, resolution, center_crop=True)


def legacy_build(folder, parts, hf_dataset, image_column, caption_column, resolution, random_flip, vae,
                 text_encoder, tokenizer, device, dtype, batch_size=16, progress=True) -> LatentCache:
    dataset = _square_dataset(hf_dataset, image_column, caption_column, resolution)
    return LatentCache.create(folder, parts, dataset, vae_moments_fn(vae, device, dtype),
                              clip_prompts_fn(tokenizer, text_encoder, device), random_flip, progress, batch_size)


def legacy_load_or_build(root, model_path, hf_dataset, image_column, caption_column, resolution, random_flip,
                         encoders_fn, tokenizer, progress=True, is_main=True, wait_fn=None) -> LatentCache:
    """``encoders_fn()`` -> (vae, text_encoder, device, dtype), called only when the cache must be built."""
    dataset = _square_dataset(hf_dataset, image_column, caption_column, resolution)
    _, model_parts = cache_key(model_path, hf_dataset, image_column, caption_column, resolution, True,
                               random_flip, tokenizer)
    parts = {"task": model_parts, "data": dataset_key_parts(dataset, random_flip)}
    folder = os.path.join(root, key_hash(parts))
    hit = os.path.isfile(os.path.join(folder, "cache.pt"))
    if not hit and is_main:
        vae, text_encoder, device, dtype = encoders_fn()
        LatentCache.create(folder, parts, dataset, vae_moments_fn(vae, device, dtype),
                           clip_prompts_fn(tokenizer, text_encoder, device), random_flip, progress)
    if wait_fn is not None:
        wait_fn()
    cache = LatentCache(folder)
    cache.hit = hit
    return cache


__all__ = ["legacy_build", "legacy_load_or_build"]
