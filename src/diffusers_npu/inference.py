"""Shared code of the ``test_infer/*.py`` inference scripts and of ``diffusers-npu generate``.

Six tasks, each a thin script over this module:

==================== ======================================= ===================================
task                 script                                  pipeline class loaded
==================== ======================================= ===================================
text-to-image        test_infer/text-to-image.py             whatever model_index.json declares
img2img              test_infer/text-guide-img-to-img.py     StableDiffusionImg2ImgPipeline
inpainting           test_infer/text-guide-image-inpainting.py StableDiffusionInpaintPipeline
textual-inversion    test_infer/textual-inversion.py         StableDiffusionPipeline
depth-to-image       test_infer/text-guide-depth-to-image.py StableDiffusionDepth2ImgPipeline
unconditional        test_infer/unconditional-image-generation.py whatever model_index.json declares
==================== ======================================= ===================================

Flow of one run (:func:`run`): parse flags (:func:`build_parser`) -> :func:`prepare` validates every
flag and input file, reads ``model_index.json`` (and the UNet / text-encoder configs) and resolves
device and dtype -- all BEFORE any weights are loaded -> :func:`load_pipeline` -> one pipeline call per
image, image ``i`` seeded with ``seed + i`` through a CPU ``torch.Generator`` (identical noise on every
device) -> PNG + JSON sidecar per image.

Errors the user can fix raise :class:`UsageError` (bad flag) or :class:`InputError` (bad file/folder);
:func:`main` prints them as one ``error: ...`` line on stderr and returns 2, with no traceback.

Output files: each PNG and its sidecar are written under a temporary name and ``os.replace``-d into
place, so no half-written file ever carries a final name. If the run fails or is interrupted, every file
this run wrote is removed again (and ``--output_dir`` too, if this run created it): a run either
delivers all requested images or none. Existing files are never overwritten; a name already taken gets a
``-2``, ``-3``... suffix.

Dtype policy: fp32 works everywhere. fp16 needs an accelerator (npu / cuda): on CPU it is refused,
because several CPU kernels lack or emulate half precision and the run would be slow or fail midway.
bf16 needs :func:`diffusers_npu.device.supports_bf16` (CPU: yes; first-generation Ascend 910 and
pre-Ampere GPUs: no). Default: fp16 on npu/cuda, fp32 on cpu.

This module imports only the standard library at import time; torch and diffusers are imported when a
run needs them, so ``--help`` and most input errors answer immediately.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

DTYPES = ("fp32", "fp16", "bf16")
ATTENTION_MODES = ("auto", "flash", "upcast", "default")  # == diffusers_npu.attention.ATTENTION_MODES
DEVICES = ("auto", "npu", "cuda", "cpu")
IMAGE_SUFFIXES = (".png", ".json")


class UsageError(Exception):
    """A flag has a wrong value or a required flag is missing. ``main`` prints it and exits with 2."""


class InputError(UsageError):
    """An input file or model folder is missing or unusable. ``main`` prints it and exits with 2."""


# ------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSpec:
    """What a task needs. ``pipeline_class`` None = the class model_index.json declares."""

    name: str
    script: str
    default_model: str
    description: str
    pipeline_class: Optional[str] = None
    unet_in_channels: Optional[int] = None  # expected UNet input channels (None: don't check)
    text: bool = True  # --prompt / --negative_prompt / --guidance_scale
    image: bool = False  # --image (+ --strength)
    mask: bool = False  # --mask_image
    size: bool = True  # --height / --width
    safety: bool = True  # --disable_safety_checker
    depth: bool = False  # --depth_map / --depth_estimator
    embeds: bool = False  # --learned_embeds / --token
    example_prompt: str = "a photo of an astronaut riding a horse on mars"

    @property
    def aliases(self) -> tuple:
        stem = os.path.splitext(self.script)[0]
        return (stem,) if stem != self.name else ()


TASKS: Dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "text-to-image", "text-to-image.py", "CompVis/ldm-text2im-large-256",
            "Generate images from a text prompt with any text-to-image pipeline (LDM text2im, Stable "
            "Diffusion, ...): the class model_index.json declares is loaded.",
            example_prompt="A painting of a squirrel eating a burger",
        ),
        TaskSpec(
            "img2img", "text-guide-img-to-img.py", "nitrosocke/Ghibli-Diffusion",
            "Text-guided image-to-image: re-draw --image following --prompt (StableDiffusionImg2ImgPipeline; "
            "any Stable Diffusion folder works).",
            pipeline_class="StableDiffusionImg2ImgPipeline", unet_in_channels=4, image=True,
            example_prompt="ghibli style, a fantasy landscape with castles",
        ),
        TaskSpec(
            "inpainting", "text-guide-image-inpainting.py", "runwayml/stable-diffusion-inpainting",
            "Text-guided inpainting: repaint the white part of --mask_image in --image following --prompt "
            "(StableDiffusionInpaintPipeline; needs an inpainting model, whose UNet has 9 input channels).",
            pipeline_class="StableDiffusionInpaintPipeline", unet_in_channels=9, image=True, mask=True,
            example_prompt="Face of a yellow cat, high resolution, sitting on a park bench",
        ),
        TaskSpec(
            "textual-inversion", "textual-inversion.py", "runwayml/stable-diffusion-v1-5",
            "Text-to-image with a textual-inversion embedding: --learned_embeds adds a new token to the "
            "tokenizer; use it in --prompt (StableDiffusionPipeline).",
            pipeline_class="StableDiffusionPipeline", unet_in_channels=4, embeds=True,
            example_prompt="a grafitti in a favela wall with a <cat-toy> on it",
        ),
        TaskSpec(
            "depth-to-image", "text-guide-depth-to-image.py", "stabilityai/stable-diffusion-2-depth",
            "Text-guided depth-to-image: re-draw --image following --prompt while keeping its depth "
            "(StableDiffusionDepth2ImgPipeline). The depth comes from the model's depth estimator, from "
            "--depth_estimator, or from --depth_map.",
            pipeline_class="StableDiffusionDepth2ImgPipeline", unet_in_channels=5, image=True, depth=True,
            example_prompt="two tigers",
        ),
        TaskSpec(
            "unconditional", "unconditional-image-generation.py", "anton-l/ddpm-butterflies-128",
            "Unconditional image generation (DDPM and other unconditional pipelines; the class "
            "model_index.json declares is loaded). The image size is the model's.",
            text=False, size=False, safety=False,
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` for a task name or script name (``text-guide-img-to-img`` = ``img2img``)."""
    key = os.path.splitext(os.path.basename(str(name)))[0]
    if key in TASKS:
        return TASKS[key]
    for spec in TASKS.values():
        if key in spec.aliases:
            return spec
    raise UsageError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------------ parser
class ArgumentParser(argparse.ArgumentParser):
    """argparse parser whose errors raise :class:`UsageError` (one line, exit 2 in ``main``)."""

    def error(self, message):  # noqa: D102 - argparse API
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0 or value >= 2**63 - 2**20:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (and < 2**63), got {text!r}")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 8, got {text!r}")
    return value


def _float(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = value != value or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and value > hi)
        if bad:
            low = f"({lo}" if lo_open else f"[{lo}"
            high = f"{hi}]" if hi is not None else "inf)"
            raise argparse.ArgumentTypeError(f"expected a number in {low}, {high}, got {text!r}")
        return value

    return parse


def add_task_arguments(parser: argparse.ArgumentParser, task: str) -> argparse.ArgumentParser:
    """Add the flags of ``task`` to ``parser`` (a fresh parser or a sub-command parser)."""
    spec = get_task(task)
    g = parser.add_argument_group("model and output")
    g.add_argument(
        "--model", default=spec.default_model, metavar="FOLDER_OR_ID",
        help="local pipeline folder (with model_index.json, as written by save_pretrained) or a Hugging Face "
        f"Hub id (default: {spec.default_model}, as in the original script; needs network access)",
    )
    g.add_argument("--output_dir", default="outputs", metavar="DIR",
                   help="folder for the PNG files and their .json sidecars; created if missing (default: outputs)")
    g.add_argument("--num_images", type=_positive_int, default=1, metavar="N",
                   help="number of images to generate (default: 1)")
    g.add_argument("--seed", type=_nonnegative_int, default=None, metavar="S",
                   help="image i uses seed S+i, through a CPU torch.Generator, so results are the same on NPU, "
                   "GPU and CPU for the same dtype (default: a random seed, printed and stored in the sidecars)")
    g.add_argument("--num_inference_steps", type=_positive_int, default=None, metavar="N",
                   help="denoising steps (default: the pipeline's own default, e.g. 50 for Stable Diffusion, "
                   "1000 for DDPM)")

    if spec.text:
        t = parser.add_argument_group("text guidance")
        t.add_argument("--prompt", default=None, metavar="TEXT",
                       help=f"the text that guides generation (required), e.g. {spec.example_prompt!r}")
        t.add_argument("--negative_prompt", default=None, metavar="TEXT",
                       help="what the image should not show (only for pipelines that accept it; LDM does not)")
        t.add_argument("--guidance_scale", type=_float(lo=0.0), default=None, metavar="G",
                       help="classifier-free guidance scale, >= 0; 1 means no guidance "
                       "(default: the pipeline's default, 7.5 for Stable Diffusion, 1.0 for LDM)")

    if spec.image or spec.size:
        i = parser.add_argument_group("images and size")
        if spec.image:
            i.add_argument("--image", default=None, metavar="FILE",
                           help="input image (required): a local file or an http(s) URL")
            if spec.mask:
                i.add_argument("--mask_image", default=None, metavar="FILE",
                               help="mask image of the same size as --image (required): white = repaint, "
                               "black = keep")
            i.add_argument("--strength", type=_float(lo=0.0, hi=1.0, lo_open=True), default=None, metavar="X",
                           help="in (0, 1]: how much of --image is re-noised; 1 ignores it entirely "
                           "(default: the pipeline's default, 0.8 for img2img/depth, 1.0 for inpainting)")
        size_help = (
            "output {0}, a multiple of 8; the inputs are resized to it (default: the input image's {0}, "
            "rounded down to a multiple of 8)" if spec.image
            else "output {0}, a multiple of 8 (default: the model's native size)"
        )
        i.add_argument("--height", type=_size, default=None, metavar="PX", help=size_help.format("height"))
        i.add_argument("--width", type=_size, default=None, metavar="PX", help=size_help.format("width"))

    if spec.depth:
        d = parser.add_argument_group("depth").add_mutually_exclusive_group()
        d.add_argument("--depth_map", default=None, metavar="FILE",
                       help="grayscale depth image used instead of running a depth estimator (brighter = "
                       "nearer, as DPT/MiDaS predict; only relative values matter; resized to the output)")
        d.add_argument("--depth_estimator", default=None, metavar="FOLDER",
                       help="local DPTForDepthEstimation folder (config.json, weights, preprocessor_config.json) "
                       "used instead of the model's own depth_estimator")

    if spec.embeds:
        e = parser.add_argument_group("textual inversion")
        e.add_argument("--learned_embeds", default=None, metavar="FILE_OR_FOLDER",
                       help="the learned embedding (required): our training's learned_embeds.safetensors "
                       "({token: tensor[n_vectors, dim]}), a .bin/.pt torch file, or an sd-concepts-library "
                       "folder (learned_embeds.bin + token_identifier.txt)")
        e.add_argument("--token", default=None, metavar="TOKEN",
                       help="the placeholder token to use in --prompt (default: token_identifier.txt next to the "
                       "embedding, else the key stored in the file)")

    r = parser.add_argument_group("device and speed")
    r.add_argument("--device", default=None, choices=DEVICES,
                   help="where to run (default: auto = npu if available, else cuda, else cpu; the "
                   "DIFFUSERS_NPU_DEVICE environment variable also sets it)")
    r.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights/compute precision (default: fp16 on npu/cuda, fp32 on cpu). fp16 is refused "
                   "on cpu; bf16 only where the device supports it")
    r.add_argument("--attention", default="auto", choices=ATTENTION_MODES,
                   help="attention implementation for the UNet/VAE (diffusers_npu.attention): auto (fused kernel "
                   "on NPU/GPU, fp32-softmax elsewhere for half precision), flash, upcast, default (stock "
                   "diffusers) (default: auto)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (channels_last; mode max-autotune with CUDA graphs on cuda). "
                   "The first image pays the compile time; on cpu allowed but slow to warm up; on npu ignored")
    if spec.safety:
        r.add_argument("--disable_safety_checker", action="store_true",
                       help="load without the NSFW safety checker (no model_index.json edit needed; also fine "
                       "if the folder has none)")
    parser.set_defaults(task=spec.name)
    return parser


def build_parser(task: str, parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The complete argument parser of a task's script (``parser`` given: add the flags to it)."""
    spec = get_task(task)
    if parser is None:
        parser = ArgumentParser(
            prog=f"python test_infer/{spec.script}",
            description=textwrap.fill(spec.description, 100),
            epilog=_epilog(spec),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return add_task_arguments(parser, spec.name)


def _epilog(spec: TaskSpec) -> str:
    extra = {
        "img2img": " --image sketch.png --strength 0.75",
        "inpainting": " --image photo.png --mask_image mask.png",
        "textual-inversion": " --learned_embeds path/to/learned_embeds.safetensors",
        "depth-to-image": " --image photo.png --strength 0.7",
    }.get(spec.name, "")
    prompt = f" --prompt {json.dumps(spec.example_prompt)}" if spec.text else ""
    return (
        "Each image is written as <output_dir>/<task>-seed<S>.png plus a .json sidecar holding every parameter.\n"
        f"example:\n  python test_infer/{spec.script} --model path/to/local/pipeline{prompt}{extra} --seed 0\n"
        f"same as:\n  diffusers-npu generate {spec.name} --model path/to/local/pipeline{prompt}{extra} --seed 0"
    )


def parse_args(task: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with the task's parser. Raises :class:`UsageError`."""
    return build_parser(task).parse_args(argv)


# ----------------------------------------------------------------------------------------- helpers
def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _is_url(path: str) -> bool:
    return bool(re.match(r"^https?://", str(path)))


def _read_json(path: str, flag: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{flag}: {path} does not hold a JSON object")
    return data


def load_image(path: str, flag: str, mode: str = "RGB"):
    """Open an image file (or URL) as a PIL image in ``mode``; :class:`InputError` names ``flag``."""
    from PIL import Image, UnidentifiedImageError

    if _is_url(path):
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


def _dict_of_tensors(obj) -> bool:
    import torch

    return isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())


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
        names = ("learned_embeds.safetensors", "learned_embeds.bin", "learned_embeds.pt")
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise InputError(f"{flag}: folder {path} has none of {', '.join(names)}")
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


def _load_depth_map(path: str, size):
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


def _token_in_vocab(folder: str, token: str) -> bool:
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


def _resolve_device(flag_value: Optional[str]) -> str:
    from . import device as _device

    try:
        return _device.detect_device(None if flag_value in (None, "auto") else flag_value)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--device: {exc}") from None


def resolve_dtype(device: str, dtype: Optional[str]) -> str:
    """Default and check ``--dtype`` for ``device`` (see the module docstring for the policy)."""
    from . import device as _device

    if dtype is None:
        return "fp32" if device == "cpu" else "fp16"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16 is not supported on cpu (half-precision CPU kernels are missing or slow); "
                         "use --dtype fp32 or bf16")
    if dtype == "bf16" and not _device.supports_bf16(device):
        raise UsageError(f"--dtype bf16 is not supported on this {device} ({_safe_device_name(device)}); "
                         "use --dtype fp16 or fp32")
    return dtype


def _safe_device_name(device: str) -> str:
    from . import device as _device

    try:
        return _device.device_name(device)
    except Exception:
        return device


def torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since diffusers 0.42 (``torch_dtype`` deprecated)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _pipeline_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not inspect.isclass(cls):
        raise InputError(f"--model: model_index.json declares pipeline class {name!r}, which diffusers "
                         f"{diffusers.__version__} does not provide")
    return cls


def _named_params(func) -> Dict[str, inspect.Parameter]:
    """Explicitly named parameters of ``func`` (not ``self``, ``*args``, ``**kwargs``)."""
    params = inspect.signature(func).parameters
    return {
        k: p for k, p in params.items()
        if k != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _default_of(params: Dict[str, inspect.Parameter], name: str):
    p = params.get(name)
    if p is None or p.default is inspect.Parameter.empty:
        return None
    return p.default


# -------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Everything a run needs, validated and resolved by :func:`prepare` (before loading weights)."""

    task: str
    model: str
    local: bool
    model_index: dict
    pipeline_class: Any  # the diffusers pipeline class that will be loaded
    device: str
    dtype: str
    attention: str
    compile: bool
    disable_safety_checker: bool
    seed: int
    num_images: int
    output_dir: str
    call_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to every pipeline call
    metadata: Dict[str, Any] = field(default_factory=dict)  # copied into every sidecar
    components: Dict[str, Any] = field(default_factory=dict)  # component overrides for from_pretrained
    depth_estimator: Optional[str] = None
    embedding: Optional[tuple] = None  # (token, tensor)


def _check_model_folder(spec: TaskSpec, args, folder: str) -> dict:
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise InputError(f"--model: folder {folder} has no model_index.json (expected a diffusers pipeline "
                         "folder written by save_pretrained)")
    index = _read_json(index_path, "--model")
    # Components this run replaces need not exist on disk.
    replaced = set()
    if getattr(args, "disable_safety_checker", False):
        replaced.add("safety_checker")
    if getattr(args, "depth_map", None) or getattr(args, "depth_estimator", None):
        replaced |= {"depth_estimator", "feature_extractor"}
    for name, value in index.items():
        if name.startswith("_") or name in replaced or not isinstance(value, (list, tuple)):
            continue
        if len(value) == 2 and value[0] is not None and not os.path.isdir(os.path.join(folder, name)):
            hint = " (pass --disable_safety_checker to run without it)" if name == "safety_checker" else ""
            raise InputError(f"--model: {folder}/{name} is missing but model_index.json lists it{hint}")
    if spec.unet_in_channels is not None:
        unet_cfg = os.path.join(folder, "unet", "config.json")
        if os.path.isfile(unet_cfg):
            channels = _read_json(unet_cfg, "--model").get("in_channels")
            if channels is not None and channels != spec.unet_in_channels:
                kind = {4: "a text-to-image/img2img model", 5: "a depth-to-image model", 9: "an inpainting model"}
                raise InputError(
                    f"--model: {folder} has a UNet with {channels} input channels "
                    f"({kind.get(channels, 'an unusual model')}); the {spec.name} task needs "
                    f"{spec.unet_in_channels} ({kind[spec.unet_in_channels]})"
                )
    return index


def _fetch_model_index(model: str) -> dict:
    """model_index.json of a Hub id (downloads that one small file)."""
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(model))
    except Exception as exc:  # offline, unknown repo, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--model: {model!r} is not a local folder, and its model_index.json could not be "
                         f"fetched from the Hugging Face Hub ({first})") from None


def _looks_like_path(model: str) -> bool:
    """True for things that can only be a local path (a Hub id is ``name`` or ``owner/name``)."""
    return (
        model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
        or bool(re.match(r"^[A-Za-z]:", model))
    )


def prepare(args: argparse.Namespace) -> Plan:
    """Validate all flags and inputs and resolve defaults, without loading any weights.

    Raises :class:`UsageError` / :class:`InputError` with a message naming the flag or file.
    """
    spec = get_task(args.task)
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731

    # 1. flags that need no file access
    if spec.text and (g("prompt") is None or not str(g("prompt")).strip()):
        raise UsageError(f"--prompt is required for the {spec.name} task (the text describing the image)")
    if spec.image and not g("image"):
        raise UsageError(f"--image is required for the {spec.name} task (the input image file)")
    if spec.mask and not g("mask_image"):
        raise UsageError("--mask_image is required for the inpainting task (white = repaint, black = keep)")
    if spec.embeds and not g("learned_embeds"):
        raise UsageError("--learned_embeds is required for the textual-inversion task (a .safetensors/.bin "
                         "file or a concepts-library folder)")
    if g("token") is not None and not str(g("token")).strip():
        raise UsageError("--token must not be empty")
    for name in ("num_inference_steps", "num_images"):
        if g(name) is not None and g(name) <= 0:
            raise UsageError(f"--{name}: expected a positive integer, got {g(name)}")
    for name in ("height", "width"):
        if g(name) is not None and (g(name) <= 0 or g(name) % 8):
            raise UsageError(f"--{name}: expected a positive multiple of 8, got {g(name)}")
    output_dir = g("output_dir") or "outputs"
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir: {output_dir} exists and is not a folder")
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output_dir: cannot write to {parent}")

    # 2. model folder / Hub id (no weights yet)
    model = str(g("model") or spec.default_model)
    local = os.path.isdir(os.path.expanduser(model))
    if local:
        model = os.path.expanduser(model)
        index = _check_model_folder(spec, args, model)
    elif os.path.exists(model):
        raise InputError(f"--model: {model} is a file; expected a pipeline folder with model_index.json")
    elif _looks_like_path(model):
        raise InputError(f"--model: folder not found: {model}")
    else:
        index = None  # Hub id: fetched below, after the cheap checks
    if g("depth_estimator"):
        est = g("depth_estimator")
        if not os.path.isdir(est):
            raise InputError(f"--depth_estimator: folder not found: {est}")
        for needed in ("config.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(est, needed)):
                raise InputError(f"--depth_estimator: {est} has no {needed} (expected a DPTForDepthEstimation "
                                 "folder with its image processor, as written by save_pretrained)")

    # 3. input images
    images: Dict[str, Any] = {}
    size = None
    if spec.image:
        image = load_image(g("image"), "--image")
        if spec.mask:
            mask = load_image(g("mask_image"), "--mask_image", mode="L")
            if mask.size != image.size:
                raise InputError(
                    f"--mask_image: {g('mask_image')} is {mask.size[0]}x{mask.size[1]} but --image "
                    f"{g('image')} is {image.size[0]}x{image.size[1]}; the mask must have the image's size"
                )
        width = g("width") or image.size[0] // 8 * 8
        height = g("height") or image.size[1] // 8 * 8
        if width == 0 or height == 0:
            raise InputError(f"--image: {g('image')} is {image.size[0]}x{image.size[1]}; it must be at least 8x8")
        size = (width, height)
        if image.size != size:
            from PIL import Image

            if not (g("width") or g("height")):
                _warn(f"--image is {image.size[0]}x{image.size[1]}; resizing to {width}x{height} (multiples of 8)")
            image = image.resize(size, Image.LANCZOS)
            if spec.mask:
                mask = mask.resize(size, Image.NEAREST)
        images["image"] = image
        if spec.mask:
            images["mask_image"] = mask
    if spec.depth and g("depth_map"):
        images["depth_map"] = _load_depth_map(g("depth_map"), size)

    # 4. embedding file
    embedding = None
    if spec.embeds:
        embedding = load_learned_embeds(g("learned_embeds"), g("token"))
        if local:
            te_cfg = os.path.join(model, "text_encoder", "config.json")
            dim = _read_json(te_cfg, "--model").get("hidden_size") if os.path.isfile(te_cfg) else None
            if dim is not None and embedding[1].shape[-1] != dim:
                raise InputError(f"--learned_embeds: the embedding has dimension {embedding[1].shape[-1]} but the "
                                 f"text encoder of {model} has {dim} (trained for a different base model?)")
            token_taken = _token_in_vocab(model, embedding[0])
            if token_taken:
                raise UsageError(f"--token: {embedding[0]!r} is already a token of {model}'s tokenizer; choose "
                                 "another placeholder, e.g. '<my-concept>'")
        if embedding[0] not in g("prompt"):
            _warn(f"--prompt does not contain the token {embedding[0]!r}, so the embedding has no effect")

    # 5. device and dtype
    device = _resolve_device(g("device"))
    dtype = resolve_dtype(device, g("dtype"))

    # 6. pipeline class and the flags it accepts
    if index is None:
        index = _fetch_model_index(model)
    class_name = spec.pipeline_class or index.get("_class_name")
    if not class_name:
        raise InputError(f"--model: {model}/model_index.json has no _class_name")
    cls = _pipeline_class(class_name)
    if spec.depth and not (g("depth_map") or g("depth_estimator")):
        entry = index.get("depth_estimator")
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None):
            raise UsageError(f"--depth_map / --depth_estimator: {model} has no depth_estimator; pass a depth "
                             "image with --depth_map FILE or a DPT folder with --depth_estimator FOLDER")

    params = _named_params(cls.__call__)
    user = {}  # flag -> pipeline argument, for flags the user set
    for name in ("negative_prompt", "guidance_scale", "strength", "height", "width"):
        if g(name) is not None:
            user[name] = g(name)
    if spec.image:
        user.pop("height", None), user.pop("width", None)  # applied by resizing the inputs
        if "height" in params and "width" in params:
            user.update(height=size[1], width=size[0])
    for name in user:
        if name not in params:
            raise UsageError(f"--{name}: {cls.__name__} (the pipeline of {model}) does not accept it")
    call = dict(user)
    if spec.text:
        call["prompt"] = g("prompt")
    call.update(images)
    steps = g("num_inference_steps") or _default_of(params, "num_inference_steps")
    if "num_inference_steps" in params and g("num_inference_steps") is not None:
        call["num_inference_steps"] = steps
    elif g("num_inference_steps") is not None:
        raise UsageError(f"--num_inference_steps: {cls.__name__} does not accept it")
    # bf16: ask for a tensor and convert it here -- DDPM/DDIM/LDM call .numpy() on the raw bf16 tensor for
    # "pil", which numpy cannot represent.
    output_type = "pt" if dtype == "bf16" else "pil"
    for internal, value in (("num_images_per_prompt", 1), ("batch_size", 1), ("output_type", output_type)):
        if internal in params:
            call[internal] = value
    for needed in ("prompt", "image", "mask_image"):
        if needed in call and needed not in params:
            raise InputError(f"--model: {cls.__name__} does not take a {needed}; it cannot run the {spec.name} task")
    guidance = g("guidance_scale") if g("guidance_scale") is not None else _default_of(params, "guidance_scale")
    strength = g("strength") if g("strength") is not None else _default_of(params, "strength")
    if "strength" in params and strength is not None and steps and int(steps * strength) < 1:
        raise UsageError(f"--strength {strength} with --num_inference_steps {steps} leaves no denoising step; "
                         "raise one of them (steps x strength must be >= 1)")

    seed = g("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        _say(f"seed: {seed} (pass --seed {seed} to reproduce)")

    import diffusers

    from . import __version__

    metadata = {
        "task": spec.name,
        "prompt": g("prompt"),
        "negative_prompt": g("negative_prompt"),
        "num_inference_steps": steps,
        "guidance_scale": guidance if "guidance_scale" in params else None,
        "strength": strength if "strength" in params else None,
        "model": model,
        "pipeline": cls.__name__,
        "device": device,
        "dtype": dtype,
        "attention": g("attention", "auto"),
        "compile": bool(g("compile")),
        "safety_checker": None,  # filled in after loading
        "image": g("image"),
        "mask_image": g("mask_image"),
        "depth_map": g("depth_map"),
        "depth_estimator": g("depth_estimator"),
        "learned_embeds": g("learned_embeds"),
        "token": embedding[0] if embedding else None,
        "base_seed": seed,
        "num_images": g("num_images") or 1,
        "diffusers_version": diffusers.__version__,
        "diffusers_npu_version": __version__,
    }
    components = {}
    if spec.depth and g("depth_map"):
        components.update(depth_estimator=None, feature_extractor=None)  # not needed: skip loading them
    return Plan(
        task=spec.name, model=model, local=local, model_index=index, pipeline_class=cls, device=device,
        dtype=dtype, attention=g("attention", "auto"), compile=bool(g("compile")),
        disable_safety_checker=bool(g("disable_safety_checker")), seed=seed, num_images=g("num_images") or 1,
        output_dir=output_dir, call_kwargs=call, metadata=metadata, components=components,
        depth_estimator=g("depth_estimator"), embedding=embedding,
    )


# ------------------------------------------------------------------------------------- pipelines
def _has_diffusers_attention(module) -> bool:
    from diffusers.models.attention_processor import Attention

    return any(isinstance(m, Attention) for m in module.modules())


def compile_unet(pipe, device: str):
    """channels_last + ``torch.compile`` of ``pipe.unet`` (in place). Returns the pipeline.

    cuda: mode ``max-autotune`` (Triton autotuning plus CUDA graphs; graph breaks are allowed, so custom
    attention processors cannot make it fail). cpu: default mode, with a warning that the first call
    compiles for a long time. npu: left eager with a warning (inductor has no Ascend
    backend here; graph mode on Ascend needs torchair).
    """
    import torch

    if device == "npu":
        _warn("--compile is ignored on npu (torch.compile/inductor has no Ascend backend; use torchair)")
        return pipe
    pipe.unet.to(memory_format=torch.channels_last)
    if device == "cuda":
        _warn("--compile on cuda: the first image includes max-autotune compilation (minutes, even for small "
              "models); later images are faster")
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune")
    else:
        _warn("--compile on cpu is slow to warm up: the first image includes minutes of compilation, and the "
              "speed-up is small")
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def apply_learned_embeds(pipe, token: str, tensor) -> List[str]:
    """Add a textual-inversion token to ``pipe`` (via diffusers' ``load_textual_inversion``)."""
    if not hasattr(pipe, "load_textual_inversion"):
        raise InputError(f"--learned_embeds: {type(pipe).__name__} cannot load textual-inversion embeddings")
    try:
        pipe.load_textual_inversion({token: tensor}, token=token)
    except ValueError as exc:
        raise UsageError(f"--token: cannot add {token!r}: {exc}") from None
    n = tensor.shape[0]
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def load_pipeline(
    model: str,
    task: str = "text-to-image",
    device: str = "cpu",
    dtype: str = "fp32",
    attention: str = "auto",
    disable_safety_checker: bool = False,
    compile: bool = False,
    depth_estimator: Optional[str] = None,
    pipeline_class=None,
    components: Optional[Dict[str, Any]] = None,
):
    """Load a pipeline for ``task`` from a local folder or Hub id, ready to call on ``device``.

    ``pipeline_class`` defaults to the task's class (or ``DiffusionPipeline``, i.e. whatever
    model_index.json declares). ``disable_safety_checker`` loads with ``safety_checker=None`` and
    ``requires_safety_checker=False`` where the class has them. ``depth_estimator`` is a local DPT folder
    that replaces the model's own. The attention mode is installed on every component with diffusers
    ``Attention`` modules; ``compile`` calls :func:`compile_unet`. ``components`` are passed on to
    ``from_pretrained`` (e.g. ``{"depth_estimator": None}`` to skip loading one).
    """
    import diffusers
    import torch

    from . import device as _device

    spec = get_task(task)
    if pipeline_class is None:
        pipeline_class = _pipeline_class(spec.pipeline_class) if spec.pipeline_class else diffusers.DiffusionPipeline
    init_params = inspect.signature(pipeline_class.__init__).parameters
    if pipeline_class is diffusers.DiffusionPipeline:  # the class is only known from model_index.json
        try:
            declared = diffusers.DiffusionPipeline.load_config(model).get("_class_name")
            init_params = inspect.signature(_pipeline_class(declared).__init__).parameters
        except Exception:  # unknown: pass the safety-checker switches anyway (ignored if unexpected)
            init_params = {"safety_checker": None, "requires_safety_checker": None}
    kwargs = dict(components or {})
    kwargs[_dtype_kwarg()] = torch_dtype(dtype)
    if disable_safety_checker:
        if "safety_checker" in init_params:
            kwargs["safety_checker"] = None
        if "requires_safety_checker" in init_params:
            kwargs["requires_safety_checker"] = False
    if depth_estimator:
        from transformers import AutoImageProcessor, DPTForDepthEstimation

        try:
            kwargs["depth_estimator"] = DPTForDepthEstimation.from_pretrained(depth_estimator).to(torch_dtype(dtype))
            kwargs["feature_extractor"] = AutoImageProcessor.from_pretrained(depth_estimator)
        except (OSError, ValueError) as exc:
            raise InputError(f"--depth_estimator: cannot load {depth_estimator}: {exc}") from None

    _device.apply_device_settings(device)
    try:
        pipe = pipeline_class.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:  # missing/corrupt files, incompatible components
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--model: cannot load a {pipeline_class.__name__} from {model}: {first}") from None
    pipe = pipe.to(device)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and _has_diffusers_attention(component):
            from .attention import set_attention

            set_attention(component, attention)
    if compile and hasattr(pipe, "unet"):
        compile_unet(pipe, device)
    elif compile:
        _warn(f"--compile: {type(pipe).__name__} has no unet; running eager")
    return pipe


# --------------------------------------------------------------------------------------- outputs
class OutputWriter:
    """Writes PNG + JSON pairs atomically and removes everything it wrote if the run fails.

    Use as a context manager: on an exception (or Ctrl-C) inside the block, the files written so far
    are deleted, and so is the output folder if this writer created it.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.created: List[str] = []  # folders this writer created, innermost last
        self.written: List[str] = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.rollback()
        return False

    def _ensure_dir(self):
        missing = []
        path = os.path.abspath(self.output_dir)
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for folder in reversed(missing):
            os.mkdir(folder)
            self.created.append(folder)

    def _free_stem(self, stem: str) -> str:
        candidate, n = stem, 1
        while any(os.path.exists(os.path.join(self.output_dir, candidate + s)) for s in IMAGE_SUFFIXES):
            n += 1
            candidate = f"{stem}-{n}"
        return candidate

    def write(self, stem: str, image, metadata: dict) -> str:
        """Write ``<stem>.png`` and ``<stem>.json``; returns the PNG path."""
        self._ensure_dir()
        stem = self._free_stem(stem)
        final_png = os.path.join(self.output_dir, stem + ".png")
        final_json = os.path.join(self.output_dir, stem + ".json")
        tmp_png = tmp_json = None
        token = f"{os.getpid()}-{os.urandom(4).hex()}"
        try:
            # Temporary names start with "." and end in ".tmp"; open(..., "x") honours the umask.
            tmp_png = os.path.join(self.output_dir, f".{stem}.{token}.png.tmp")
            with open(tmp_png, "xb") as f:
                image.save(f, format="PNG")
            tmp_json = os.path.join(self.output_dir, f".{stem}.{token}.json.tmp")
            with open(tmp_json, "x", encoding="utf-8") as f:
                json.dump(metadata, f, indent=2)
                f.write("\n")
            os.replace(tmp_png, final_png)
            tmp_png = None
            self.written.append(final_png)
            os.replace(tmp_json, final_json)
            tmp_json = None
            self.written.append(final_json)
        finally:
            for tmp in (tmp_png, tmp_json):
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
        return final_png

    def rollback(self):
        for path in reversed(self.written):
            try:
                os.remove(path)
            except OSError:
                pass
        self.written.clear()
        for folder in reversed(self.created):
            try:
                os.rmdir(folder)  # only if empty
            except OSError:
                pass
        self.created.clear()


# ------------------------------------------------------------------------------------------- run
def to_pil(image):
    """A pipeline output image (PIL, or a [0, 1] CHW tensor / HWC array) as a PIL image."""
    import numpy as np
    import torch
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = image.permute(1, 2, 0) if image.ndim == 3 else image
        image = image.numpy()
    array = (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def generate(plan: Plan, pipe) -> List[str]:
    """Generate ``plan.num_images`` images with ``pipe``; write PNG + sidecar each. Returns PNG paths."""
    import torch
    from tqdm.auto import tqdm

    from . import device as _device

    components = getattr(pipe, "components", {})
    if "safety_checker" not in components:
        safety = None  # the pipeline class has no safety checker (LDM, DDPM, ...)
    elif components["safety_checker"] is not None:
        safety = "enabled"
    else:
        safety = "disabled" if plan.disable_safety_checker else "absent"
    paths = []
    with OutputWriter(plan.output_dir) as writer:
        bar = tqdm(range(plan.num_images), desc=plan.task, unit="image", disable=plan.num_images == 1)
        for i in bar:
            seed = plan.seed + i
            _device.seed_everything(seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            pipe.set_progress_bar_config(desc=f"image {i + 1}/{plan.num_images}", leave=False)
            _device.synchronize(plan.device)
            start = time.perf_counter()
            output = pipe(**plan.call_kwargs, generator=generator)
            _device.synchronize(plan.device)
            seconds = time.perf_counter() - start
            image = to_pil(output.images[0])
            nsfw = getattr(output, "nsfw_content_detected", None)
            nsfw = bool(nsfw[0]) if isinstance(nsfw, (list, tuple)) and nsfw and nsfw[0] is not None else None
            if nsfw:
                _warn(f"image {i + 1}: the safety checker flagged it (NSFW) and blanked it")
            meta = dict(plan.metadata)
            meta.update(
                seed=seed, index=i, width=image.size[0], height=image.size[1], seconds=round(seconds, 4),
                safety_checker=safety, nsfw_content_detected=nsfw,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            path = writer.write(f"{plan.task}-seed{seed}", image, meta)
            paths.append(path)
            bar.write(f"saved {path}", file=sys.stdout)
    return paths


def run(args: argparse.Namespace) -> List[str]:
    """Validate, load, generate. Returns the written PNG paths. Raises :class:`UsageError`."""
    plan = prepare(args)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Noise that is not the user's business: tiny/old scheduler configs, and depth2img's fp32 autocast.
        warnings.filterwarnings("ignore", message=".*steps_offset.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        pipe = load_pipeline(
            plan.model, task=plan.task, device=plan.device, dtype=plan.dtype, attention=plan.attention,
            disable_safety_checker=plan.disable_safety_checker, compile=plan.compile,
            depth_estimator=plan.depth_estimator, pipeline_class=plan.pipeline_class,
            components=plan.components,
        )
        if plan.embedding is not None:
            tokens = apply_learned_embeds(pipe, *plan.embedding)
            _say(f"loaded textual-inversion token {plan.embedding[0]} ({len(tokens)} vector(s))")
        _say(f"loaded {type(pipe).__name__} from {plan.model} on {plan.device} ({plan.dtype}) "
             f"in {time.perf_counter() - start:.1f}s")
        paths = generate(plan, pipe)
    _say(f"{len(paths)} image(s) written to {plan.output_dir}")
    return paths


def main(task: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the task scripts: returns 0, or 2 after printing ``error: ...`` for bad input."""
    try:
        args = parse_args(task, argv)
        run(args)
    except UsageError as exc:
        _say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted; removed the files of this run")
        return 130
    return 0


# ------------------------------------------------------------------------------------ cli support
def run_cli(args: argparse.Namespace) -> int:
    """``diffusers-npu generate`` handler (UsageError is reported by ``diffusers_npu.cli.main``)."""
    run(args)
    return 0


def configure_generate_parser(parser: argparse.ArgumentParser) -> None:
    """Fill the ``diffusers-npu generate`` sub-parser: one sub-command per task (script names as aliases)."""
    tasks = parser.add_subparsers(dest="task_name", metavar="TASK", required=True,
                                  help=f"one of: {', '.join(TASKS)}")
    for spec in TASKS.values():
        sub = tasks.add_parser(
            spec.name, aliases=list(spec.aliases), help=spec.description.split(":")[0].split(" (")[0],
            description=textwrap.fill(spec.description, 100), epilog=_epilog(spec),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_task_arguments(sub, spec.name)
        sub.set_defaults(func=run_cli)


__all__ = [
    "ATTENTION_MODES",
    "DTYPES",
    "InputError",
    "OutputWriter",
    "Plan",
    "TASKS",
    "TaskSpec",
    "UsageError",
    "add_task_arguments",
    "apply_learned_embeds",
    "build_parser",
    "compile_unet",
    "configure_generate_parser",
    "generate",
    "get_task",
    "load_image",
    "load_learned_embeds",
    "load_pipeline",
    "main",
    "parse_args",
    "prepare",
    "resolve_dtype",
    "run",
    "run_cli",
    "torch_dtype",
]
