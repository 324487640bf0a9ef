"""Image helpers shared by every task: decoding any cell to 8-bit RGB, resize + crop, tensors, image folders.

Decoding (:func:`load_pil`) is where data sets surprise users, so it is strict and explicit:

* 16-bit images (``I;16*``, and ``I`` holding 16-bit values) are scaled to 8 bits (``v / 257``); PIL's own
  ``convert("RGB")`` clips them, which turns a 16-bit PNG white.
* float images (``F``) are read as ``[0, 1]`` (the convention of numpy/scikit-image float images) or, when
  a value exceeds 1, as PIL's ``[0, 255]``; any other range, or a non-finite value, is refused by name.
* images with transparency are composited on white (see :func:`to_rgb`).
* anything that cannot be decoded is a :class:`~diffusers_npu.errors.DataError` naming where the cell came
  from (row and column) and the file.

Geometry (:func:`resize_crop`) follows upstream diffusers: resize so the image covers the target, crop, and
report the crop's top-left corner in the resized image plus the original size, which is what SDXL's
micro-conditioning ("time ids") is made of.
"""
from __future__ import annotations

import io
import os
import random

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Upstream's --image_interpolation_mode names (torchvision's InterpolationMode, lower case) -> PIL filter.
# torchvision itself maps nearest_exact to PIL's NEAREST for PIL images: PIL's nearest already samples pixel
# centres, which is what "exact" fixes in torch's tensor kernel.
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}
DEFAULT_INTERPOLATION = "lanczos"  # upstream train_text_to_image.py's --image_interpolation_mode default

DERIVED_CONDITIONING = ("sobel", "blur")


# ------------------------------------------------------------------------------------------------ decoding
class _Refused(ValueError):
    """An image that decodes but whose values have no defined 8-bit meaning."""


def _source_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("path") or None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return getattr(value, "filename", None) or None


def open_image(value) -> Image.Image:
    """Open (lazily: header only) a cell: PIL image, datasets' ``{'bytes', 'path'}`` dict, bytes or a path."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ValueError("empty image cell (no bytes and no path)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value)))
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode, scaling (never clipping) high-bit-depth data."""
    mode = img.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(np.rint(np.asarray(img).astype(np.float64) / 257.0))
    if mode == "I":  # 32-bit signed; PNG/TIFF readers use it for 16-bit data
        arr = np.asarray(img)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise _Refused(f"32-bit integer image with values {lo}..{hi}: only 0..65535 (16-bit) has a known "
                           f"white level; convert it to 8 or 16 bits")
        return _gray_to_rgb(np.rint(arr.astype(np.float64) / 257.0))
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise _Refused("float image with NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise _Refused(f"float image with values {lo:g}..{hi:g}: expected 0..1 (or PIL's 0..255)")
        scale = 255.0 if hi <= 1.0 else 1.0
        return _gray_to_rgb(np.rint(arr * scale))
    transparent = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if transparent:
        # Colour under alpha 0 is undefined (often black, sometimes garbage left by the editor); dropping the
        # alpha channel would train on it. White is the background such images (logos, stickers, product
        # shots, line art) are drawn for, and matches how they look in a viewer or a browser page.
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV: PIL converts these correctly


def load_pil(value, where: str) -> Image.Image:
    """Decode a cell to 8-bit RGB; a :class:`DataError` naming ``where`` and the file if that fails."""
    try:
        img = open_image(value)
        img.load()
        return to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        name = _source_name(value)
        named = f" ({name})" if name else ""
        reason = str(e) if isinstance(e, _Refused) else f"{type(e).__name__}: {e}"
        raise DataError(f"cannot read image {where}{named}: {reason}") from e


# ------------------------------------------------------------------------------------------------ geometry
def covering_size(size_hw, target_hw) -> tuple[int, int]:
    """The (h, w) an image of ``size_hw`` is resized to so that it covers ``target_hw`` (aspect kept)."""
    h, w = size_hw
    th, tw = target_hw
    s = max(th / h, tw / w)
    return max(th, round(h * s)), max(tw, round(w * s))


def resize_crop(img: Image.Image, size_hw, center_crop: bool, rng: random.Random | None,
                interpolation: str = DEFAULT_INTERPOLATION, flip: bool = False):
    """Resize ``img`` to cover ``size_hw`` (h, w), crop to it, optionally mirror it.

    Returns ``(image, (top, left), (orig_h, orig_w))``. The crop corner is in the resized image as upstream
    SDXL records it; when ``flip`` is set it is the corner in the mirrored image (what the model is shown),
    which is where upstream's flip-then-crop puts it. ``rng`` draws the random crop (``left`` then ``top``);
    it is unused with ``center_crop``.
    """
    th, tw = int(size_hw[0]), int(size_hw[1])
    ow, oh = img.size
    nh, nw = covering_size((oh, ow), (th, tw))
    if (nw, nh) != (ow, oh):
        img = img.resize((nw, nh), INTERPOLATIONS[interpolation])
    if center_crop:
        left, top = int(round((nw - tw) / 2.0)), int(round((nh - th) / 2.0))  # as torchvision's CenterCrop
    else:
        left, top = rng.randint(0, nw - tw), rng.randint(0, nh - th)
    if (nw, nh) != (tw, th):
        img = img.crop((left, top, left + tw, top + th))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - left - tw
    return img, (top, left), (oh, ow)


def to_tensor(img: Image.Image, unit: bool = False) -> torch.Tensor:
    """Float CHW tensor of an RGB image: in [-1, 1] (the VAE's input), or [0, 1] with ``unit``."""
    arr = np.asarray(img, dtype=np.float32)
    arr = arr / 255.0 if unit else arr / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_transform(img, resolution: int, center_crop: bool, flip: bool, rng: random.Random,
                    interpolation: str = DEFAULT_INTERPOLATION) -> torch.Tensor:
    """Square resize + crop + flip to a [-1, 1] tensor (the pre-bucket helper; kept for its callers)."""
    out, _, _ = resize_crop(img, (resolution, resolution), center_crop, rng, interpolation, flip=flip)
    return to_tensor(out)


def derive_conditioning(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """A ControlNet conditioning image in [0, 1] (3 x H x W) made from an image in [-1, 1]: Sobel edge
    magnitude (normalised to a peak of 1) or a box blur (kernel ~1/8 of the width)."""
    import torch.nn.functional as F

    gray = ((pixels.float().mean(dim=0, keepdim=True) + 1) / 2).unsqueeze(0)  # 1 x 1 x H x W
    if kind == "sobel":
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
        gx = F.conv2d(padded, kx.view(1, 1, 3, 3))
        gy = F.conv2d(padded, kx.t().contiguous().view(1, 1, 3, 3))
        out = torch.sqrt(gx ** 2 + gy ** 2)
        peak = out.max()
        out = out / peak if peak > 0 else out
    elif kind == "blur":
        k = max(3, (gray.shape[-1] // 8) | 1)
        out = F.avg_pool2d(gray, k, stride=1, padding=k // 2, count_include_pad=False)
    else:
        raise ValueError(f"unknown derived conditioning {kind!r} (expected one of {DERIVED_CONDITIONING})")
    return out[0].expand(3, -1, -1).clamp(0, 1).contiguous()


# ------------------------------------------------------------------------------------------- image folders
def list_images(folder: str, flag: str, allow_empty: bool = False) -> list[str]:
    """Image files directly inside ``folder`` (sorted; hidden and partial files skipped)."""
    if not os.path.isdir(folder):
        if allow_empty:
            return []
        raise DataError(f"{flag}: {folder} is not a folder of images")
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    if not files and not allow_empty:
        raise DataError(f"{flag}: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def write_images(cells, folder: str) -> str:
    """Write image cells as PNGs ``instance-000.png``... into ``folder``, replacing it as a whole: readers see
    the old folder or the complete new one, and a failure leaves no partial folder behind."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-images-", dir=parent)
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it is an ordinary output folder
        for i, cell in enumerate(cells):
            load_pil(cell, f"image {i}").save(os.path.join(tmp, f"instance-{i:03d}.png"))
        if os.path.exists(folder):  # rename the old folder away first: os.replace cannot replace a folder
            old = tempfile.mkdtemp(prefix=".old-images-", dir=parent)
            os.replace(folder, os.path.join(old, "x"))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old and not os.path.exists(folder) and os.path.exists(os.path.join(old, "x")):
            os.replace(os.path.join(old, "x"), folder)  # put the previous images back
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return folder


__all__ = ["DEFAULT_INTERPOLATION", "DERIVED_CONDITIONING", "IMAGE_EXTENSIONS", "INTERPOLATIONS",
           "covering_size", "derive_conditioning", "image_transform", "list_images", "load_pil", "open_image",
           "resize_crop", "to_rgb", "to_tensor", "write_images"]
