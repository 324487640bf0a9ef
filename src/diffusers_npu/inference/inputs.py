"""Input loaders of the inference tasks: images, depth maps, textual-inversion embeddings, LoRA weights,
ControlNet folders, and the base model a training output records.

Each loader checks its input completely before any model weights are loaded, and raises
:class:`~diffusers_npu.errors.InputError` (or ``UsageError``) naming the flag and the file. torch, PIL and
safetensors are imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Tuple

from ..errors import InputError, UsageError
from ..model_folder import TRAINING_INFO_NAME, base_model_of, looks_local

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
EMBEDS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin", "learned_embeds.pt")


def is_url(path: str) -> bool:
    return bool(re.match(r"^https?://", str(path)))


def read_json(path: str, flag: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{flag}: {path} does not hold a JSON object")
    return data


def load_image(path: str, flag: str, mode: str = "RGB"):
    """Open an image file (or URL) as a PIL image in ``mode``; :class:`InputError` names ``flag``.
    ``mode="depth"`` keeps 16-bit and float images as they are (else grayscale)."""
    from PIL import Image, UnidentifiedImageError

    if is_url(path):
        try:
            from diffusers.utils import load_image as _load_url

            return _load_url(path).convert(mode)
        except Exception as exc:  # network / decoding errors
            raise InputError(f"{flag}: cannot download image {path}: {exc}") from None
    if not os.path.exists(path):
        raise InputError(f"{flag}: image file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{flag}: {path} is a folder, expected an image file")
    try:
        with Image.open(path) as img:
            img.load()
            if mode == "depth" and img.mode in ("I", "I;16", "I;16B", "F"):
                return img.copy()
            return img.convert("L" if mode == "depth" else mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{flag}: {path} is not a readable image ({exc})") from None


def load_depth_map(path: str, size):
    """Grayscale depth image -> float tensor [1, H, W] at ``size`` (width, height)."""
    import numpy as np
    import torch
    from PIL import Image

    img = load_image(path, "--depth_map", mode="depth")
    if img.size != tuple(size):
        img = img.convert("F").resize(tuple(size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim != 2:
        raise InputError(f"--depth_map: {path} must be a single-channel (grayscale) image")
    if float(arr.max() - arr.min()) == 0.0:
        raise InputError(f"--depth_map: {path} is a constant image; a depth map needs varying values")
    return torch.from_numpy(arr.copy())[None]


def _dict_of_tensors(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_learned_embeds(path: str, token: Optional[str] = None):
    """Read a textual-inversion embedding. Returns ``(token, tensor[n_vectors, dim])``.

    Accepts our training output (``learned_embeds.safetensors``: ``{token: tensor[n, dim]}``), torch
    ``.bin``/``.pt`` files (``{token: tensor[dim] or [1, dim]}``, also the A1111 ``string_to_param``
    layout), and sd-concepts-library folders (``learned_embeds.bin`` + ``token_identifier.txt``).
    The token is ``token`` if given, else ``token_identifier.txt`` (in the folder or next to the file),
    else the key stored in the file. Raises :class:`InputError` naming ``--learned_embeds``/``--token``.
    """
    import torch

    flag = "--learned_embeds"
    if not os.path.exists(path):
        raise InputError(f"{flag}: not found: {path}")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in EMBEDS_NAMES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise InputError(f"{flag}: folder {path} has none of {', '.join(EMBEDS_NAMES)}")
        path = found[0]
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, pickle refused
        raise InputError(f"{flag}: cannot read {path}: {exc}") from None

    if isinstance(state, dict) and "string_to_param" in state:  # A1111 / original textual inversion
        params = state["string_to_param"]
        stored_token, tensor = state.get("name"), (params.get("*") if isinstance(params, dict) else None)
    elif _dict_of_tensors(state) and len(state) == 1:
        stored_token, tensor = next(iter(state.items()))
    elif _dict_of_tensors(state):
        keys = ", ".join(sorted(state))
        raise InputError(f"{flag}: {path} holds {len(state)} embeddings ({keys}); expected exactly one")
    else:
        raise InputError(f"{flag}: {path} is not a {{token: tensor}} embedding file")
    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or tensor.numel() == 0:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(f"{flag}: {path}: expected a tensor of shape [dim] or [n_vectors, dim], got {shape}")
    if tensor.ndim == 1:
        tensor = tensor[None]

    if token is None:
        ident = os.path.join(folder, "token_identifier.txt")
        if os.path.isfile(ident):
            with open(ident, encoding="utf-8") as f:
                token = f.read().strip() or None
    token = token if token is not None else stored_token
    if not token or not str(token).strip():
        raise UsageError(f"--token: {path} stores no token name; pass --token, e.g. --token '<my-concept>'")
    if any(c.isspace() for c in str(token)):
        raise UsageError(f"--token: {token!r} contains white space; a placeholder token must be one word")
    return str(token), tensor.detach().to(torch.float32)


def token_in_vocab(folder: str, token: str) -> bool:
    """Whether ``token`` is already in the tokenizer of a local pipeline folder (False if unknown)."""
    if not os.path.isdir(os.path.join(folder, "tokenizer")):
        return False
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except Exception:  # unreadable here; load_textual_inversion will report it
        return False
    vocab = tokenizer.get_vocab()
    return token in vocab or f"{token}_1" in vocab


def check_lora(path: str) -> Tuple[str, str]:
    """``--lora``: a LoRA file, or a folder holding ``pytorch_lora_weights.safetensors`` (our training output,
    diffusers' ``save_lora_weights``). Returns ``(folder, weight file name)`` for ``load_lora_weights``."""
    flag = "--lora"
    if not os.path.exists(path):
        raise InputError(f"{flag}: not found: {path}")
    if os.path.isdir(path):
        names = [n for n in LORA_WEIGHT_NAMES if os.path.isfile(os.path.join(path, n))]
        if not names:
            others = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            if len(others) != 1:
                raise InputError(f"{flag}: folder {path} has no {LORA_WEIGHT_NAMES[0]}"
                                 + (f" and {len(others)} other .safetensors files; pass the file itself" if others
                                    else " (expected a LoRA training output or a LoRA weights file)"))
            names = others
        folder, name = path, names[0]
    else:
        folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        if not name.endswith((".safetensors", ".bin")):
            raise InputError(f"{flag}: {path}: expected a .safetensors (or .bin) LoRA weights file")
    file = os.path.join(folder, name)
    if name.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:  # reads the header only
                keys = list(f.keys())
        except Exception as exc:  # not a safetensors file
            raise InputError(f"{flag}: cannot read {file}: {exc}") from None
        if not any("lora" in k.lower() for k in keys):
            raise InputError(f"{flag}: {file} holds no LoRA weights (none of its {len(keys)} tensors is named "
                             "lora_*); is it a full model file?")
    return folder, name


#: the ControlNet classes --controlnet takes (None: an old config without _class_name, a ControlNetModel)
CONTROLNET_CLASSES = (None, "ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")


def check_controlnet(path: str) -> Optional[dict]:
    """``--controlnet``: a local ControlNetModel folder (config.json + weights); returns its config. A Hub id
    returns None (checked when it is loaded)."""
    flag = "--controlnet"
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise InputError(f"{flag}: {path} is a file; expected a ControlNet folder (config.json + weights)")
        if looks_local(path):
            raise InputError(f"{flag}: folder not found: {path}")
        return None
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"{flag}: {path} has no config.json (expected a ControlNetModel folder written by "
                         "save_pretrained, e.g. our ControlNet training output)")
    config = read_json(config_path, flag)
    if config.get("_class_name") not in CONTROLNET_CLASSES:
        raise InputError(f"{flag}: {path} holds a {config.get('_class_name')}, not a ControlNet "
                         f"({', '.join(c for c in CONTROLNET_CLASSES if c)})")
    if not any(n.startswith("diffusion_pytorch_model") for n in os.listdir(path)):
        raise InputError(f"{flag}: {path} has no diffusion_pytorch_model.safetensors (weights)")
    return config


def training_output_folder(path: str) -> str:
    """The folder of a training output given as a file or a folder."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def recorded_base_model(flag: str, path: str) -> Optional[Tuple[str, str]]:
    """``(base model, file that records it)`` for a training output given with ``flag``, or None.

    A relative base path that does not exist from here is tried relative to the output folder.
    """
    folder = training_output_folder(path)
    base = base_model_of(folder)
    if base is None:
        return None
    info = os.path.join(folder, TRAINING_INFO_NAME)
    try:
        with open(info, encoding="utf-8") as f:
            if json.load(f).get("base_model") != base:
                info = os.path.join(folder, "lora_info.json")
    except (OSError, ValueError, AttributeError):  # training_info.json absent or unreadable: the older file
        info = os.path.join(folder, "lora_info.json")
    if not os.path.isabs(base) and not os.path.exists(base) and os.path.exists(os.path.join(folder, base)):
        base = os.path.join(folder, base)
    return os.path.expanduser(base), info


__all__ = [
    "EMBEDS_NAMES",
    "LORA_WEIGHT_NAMES",
    "check_controlnet",
    "check_lora",
    "is_url",
    "load_depth_map",
    "load_image",
    "load_learned_embeds",
    "read_json",
    "recorded_base_model",
    "token_in_vocab",
    "training_output_folder",
]
