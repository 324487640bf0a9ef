"""What a benchmarked run trains on, written as a user's files: a pipeline folder of a preset architecture with
random weights, and an image folder (``metadata.jsonl`` + JPEG files) of random images with captions.

The training command the harness times is then exactly a user's command (``--pretrained_model_name_or_path
MODEL --train_data_dir DATA``). Each folder has a stamp file beside it (``<folder>.stamp.json``, outside the
folder so that no loader sees it); a ``--work_dir`` that already holds matching folders is reused (building
SDXL's 2.6 B-parameter UNet and writing its 10 GB take a minute).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from ..fsutil import write_json_atomic

FORMAT = 1


def _stamp_matches(folder: str, stamp: dict) -> bool:
    try:
        with open(folder + ".stamp.json") as f:
            return json.load(f) == stamp and os.path.isdir(folder)
    except (OSError, ValueError):
        return False


def _fresh(folder: str) -> str:
    """An empty temp sibling of ``folder`` (renamed into place when complete: no half-written fixture)."""
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _install(tmp: str, folder: str, stamp: dict) -> str:
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    write_json_atomic(folder + ".stamp.json", stamp)  # last: a stamp names only a complete folder
    return folder


def model_folder(work_dir: str, preset: str, seed: int = 0, build_device: str = "cpu") -> tuple[str, float]:
    """``<work_dir>/model-<preset>``: a diffusers pipeline folder with random weights (seeded). Returns the folder
    and the seconds spent building it (0 when reused). On an accelerator the weights are initialised there
    (much faster than CPU initialisation of SDXL's UNet) and saved from there."""
    from ..presets import build_components, build_tokenizer, get_preset, save_pipeline_folder

    folder = os.path.join(work_dir, f"model-{preset}")
    stamp = {"kind": "model", "preset": preset, "seed": seed, "format": FORMAT}
    if _stamp_matches(folder, stamp):
        return folder, 0.0
    t0 = time.perf_counter()
    tmp = _fresh(folder)
    try:
        p = get_preset(preset)
        tok_dir = os.path.join(tmp, "_tokenizer_src")
        try:
            with torch.device(build_device):
                comps = build_components(preset, seed=seed, tokenizer_dir=tok_dir)
        except Exception:  # an accelerator that cannot initialise them: the same weights' shapes, on CPU
            if build_device == "cpu":
                raise
            with torch.device("cpu"):
                comps = build_components(preset, seed=seed, tokenizer_dir=tok_dir)
        if comps["tokenizer"] is None:  # large presets: a whole-word CLIP tokenizer, 77 ids, small vocabulary
            comps["tokenizer"] = build_tokenizer(tok_dir, max_length=p.tokenizer_max_length)
            if "tokenizer_2" in comps:
                comps["tokenizer_2"] = comps["tokenizer"]
        save_pipeline_folder(comps, tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        del comps
        return _install(tmp, folder, stamp), time.perf_counter() - t0
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def image_folder(work_dir: str, num_images: int, resolution: int, seed: int = 0) -> tuple[str, float]:
    """``<work_dir>/data-<n>x<px>``: ``num_images`` random RGB JPEGs of ``resolution`` px squared and a
    ``metadata.jsonl`` with ``file_name`` and ``text`` (captions of 3-7 words of the whole-word tokenizer)."""
    import numpy as np
    from PIL import Image

    from ..presets import EMBEDDED_WORDS

    folder = os.path.join(work_dir, f"data-{num_images}x{resolution}")
    stamp = {"kind": "images", "n": num_images, "resolution": resolution, "seed": seed, "format": FORMAT}
    if _stamp_matches(folder, stamp):
        return folder, 0.0
    t0 = time.perf_counter()
    tmp = _fresh(folder)
    try:
        rng = np.random.default_rng(seed)
        lines = []
        low_side = max(2, resolution // 16)
        for i in range(num_images):
            # Smooth content (upscaled coarse noise) plus fine noise: JPEG sizes like photos', not like noise's.
            low = rng.integers(0, 256, (low_side, low_side, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(low).resize((resolution, resolution), Image.BILINEAR), dtype=np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            name = f"{i:05d}.jpg"
            Image.fromarray(img).save(os.path.join(tmp, name), quality=92)
            words = rng.choice(len(EMBEDDED_WORDS), size=int(rng.integers(3, 8)))
            lines.append(json.dumps({"file_name": name, "text": " ".join(EMBEDDED_WORDS[w] for w in words)}))
        with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return _install(tmp, folder, stamp), time.perf_counter() - t0
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
