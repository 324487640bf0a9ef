"""The plan of a run: every flag and input file validated, and every default resolved, BEFORE any weights
load (:func:`prepare`). Bad input is one :class:`~diffusers_npu.errors.UsageError` / ``InputError`` /
``ModelError`` line naming the flag or file, and nothing has been written yet.

Dtype policy: fp32 works everywhere. fp16 needs an accelerator (npu / cuda): on CPU it is refused,
because several CPU kernels lack or emulate half precision and the run would be slow or fail midway.
bf16 needs :func:`diffusers_npu.device.supports_bf16` (CPU: yes; first-generation Ascend 910 and
pre-Ampere GPUs: no). Default: fp16 on npu/cuda, fp32 on cpu.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..errors import InputError, UsageError
from . import inputs
from .models import (check_controlnet_matches, check_refiner, check_unet_channels, component_config,
                     fetch_hub_index, pipeline_class_for, resolve_model)
from .tasks import DTYPES, get_task


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
    sdxl: bool = False
    local_files_only: bool = False
    lora: Optional[tuple] = None  # (folder, weight file name)
    lora_scale: float = 1.0
    controlnet: Optional[str] = None
    controlnet_class: str = "ControlNetModel"  # or SD3ControlNetModel / FluxControlNetModel (its config says)
    controlnet_cache_only: bool = False  # a Hub id found only in the local cache (offline)
    refiner: Optional[str] = None
    refiner_cache_only: bool = False
    refiner_kwargs: Dict[str, Any] = field(default_factory=dict)  # the refiner's call (with --refiner)


def resolve_device(flag_value: Optional[str]) -> str:
    from .. import device as _device

    try:
        return _device.detect_device(None if flag_value in (None, "auto") else flag_value)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--device: {exc}") from None


def _device_name(device: str) -> str:
    from .. import device as _device

    try:
        return _device.device_name(device)
    except Exception:  # a description only
        return device


def resolve_dtype(device: str, dtype: Optional[str]) -> str:
    """Default and check ``--dtype`` for ``device`` (see the module docstring for the policy)."""
    from .. import device as _device

    if dtype is None:
        return "fp32" if device == "cpu" else "fp16"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "fp16" and device == "cpu":
        raise UsageError("--dtype fp16 is not supported on cpu (half-precision CPU kernels are missing or slow); "
                         "use --dtype fp32 or bf16")
    if dtype == "bf16" and not _device.supports_bf16(device):
        raise UsageError(f"--dtype bf16 is not supported on this {device} ({_device_name(device)}); "
                         "use --dtype fp16 or fp32")
    return dtype


def _named_params(func) -> Dict[str, inspect.Parameter]:
    """Explicitly named parameters of ``func`` (not ``self``, ``*args``, ``**kwargs``)."""
    params = inspect.signature(func).parameters
    return {k: p for k, p in params.items()
            if k != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _default_of(params: Dict[str, inspect.Parameter], name: str):
    p = params.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def _check_flags(spec, g) -> str:
    """Checks that need no file access. Returns the output folder."""
    if spec.text and (g("prompt") is None or not str(g("prompt")).strip()):
        raise UsageError(f"--prompt is required for the {spec.name} task (the text describing the image)")
    if spec.image and not g("image"):
        what = "the conditioning image file" if spec.controlnet else "the input image file"
        raise UsageError(f"--image is required for the {spec.name} task ({what})")
    if spec.mask and not g("mask_image"):
        raise UsageError("--mask_image is required for the inpainting task (white = repaint, black = keep)")
    if spec.embeds and not g("learned_embeds"):
        raise UsageError("--learned_embeds is required for the textual-inversion task (a .safetensors/.bin "
                         "file or a concepts-library folder)")
    if spec.controlnet and not g("controlnet"):
        raise UsageError("--controlnet is required for the controlnet task (a ControlNetModel folder)")
    if g("token") is not None and not str(g("token")).strip():
        raise UsageError("--token must not be empty")
    if g("lora_scale") is not None and not g("lora"):
        raise UsageError("--lora_scale only applies with --lora")
    if g("high_noise_frac") is not None and not g("refiner"):
        raise UsageError("--high_noise_frac only applies with --refiner")
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
    return output_dir


def _load_images(spec, g) -> tuple:
    """The input images at the output size: ({call argument: image}, (width, height) or None)."""
    images: Dict[str, Any] = {}
    size = None
    if spec.image:
        from PIL import Image

        image = inputs.load_image(g("image"), "--image")
        mask = None
        if spec.mask:
            mask = inputs.load_image(g("mask_image"), "--mask_image", mode="L")
            if mask.size != image.size:
                raise InputError(
                    f"--mask_image: {g('mask_image')} is {mask.size[0]}x{mask.size[1]} but --image "
                    f"{g('image')} is {image.size[0]}x{image.size[1]}; the mask must have the image's size")
        width = g("width") or image.size[0] // 8 * 8
        height = g("height") or image.size[1] // 8 * 8
        if width == 0 or height == 0:
            raise InputError(f"--image: {g('image')} is {image.size[0]}x{image.size[1]}; it must be at least 8x8")
        size = (width, height)
        if image.size != size:
            if not (g("width") or g("height")):
                warn(f"--image is {image.size[0]}x{image.size[1]}; resizing to {width}x{height} (multiples of 8)")
            image = image.resize(size, Image.LANCZOS)
            if mask is not None:
                mask = mask.resize(size, Image.NEAREST)
        images["image"] = image
        if mask is not None:
            images["mask_image"] = mask
    if spec.depth and g("depth_map"):
        images["depth_map"] = inputs.load_depth_map(g("depth_map"), size)
    return images, size


def _check_embedding(spec, g, choice):
    if not spec.embeds:
        return None
    embedding = inputs.load_learned_embeds(g("learned_embeds"), g("token"))
    if choice.local:
        dim = component_config(choice, "text_encoder").get("hidden_size")
        if dim is not None and embedding[1].shape[-1] != dim:
            raise InputError(f"--learned_embeds: the embedding has dimension {embedding[1].shape[-1]} but the "
                             f"text encoder of {choice.model} has {dim} (trained for a different base model?)")
        if inputs.token_in_vocab(choice.model, embedding[0]):
            raise UsageError(f"--token: {embedding[0]!r} is already a token of {choice.model}'s tokenizer; choose "
                             "another placeholder, e.g. '<my-concept>'")
    if embedding[0] not in g("prompt"):
        warn(f"--prompt does not contain the token {embedding[0]!r}, so the embedding has no effect")
    return embedding


def _check_model_companions(spec, g, choice, cn_config) -> tuple:
    """What must fit the model: UNet channels, ControlNet, refiner, depth estimator. Returns whether the
    ControlNet and the refiner come from the local Hub cache only (offline), and the ControlNet's class."""
    check_unet_channels(spec, choice)
    cn_cache_only = refiner_cache_only = False
    if g("controlnet") and cn_config is None:  # a Hub id: its config.json, from the cache when offline
        cn_config, cn_cache_only = fetch_hub_index(g("controlnet"), "--controlnet", filename="config.json",
                                                   what="ControlNet")
    if cn_config is not None:
        check_controlnet_matches(cn_config, g("controlnet"), choice)
    if g("refiner"):
        if not choice.sdxl:
            raise UsageError(f"--refiner: {choice.model} is not a Stable Diffusion XL pipeline; the refiner "
                             "finishes SDXL images only")
        refiner_cache_only = check_refiner(g("refiner"))
    if g("depth_estimator"):
        est = g("depth_estimator")
        if not os.path.isdir(est):
            raise InputError(f"--depth_estimator: folder not found: {est}")
        for needed in ("config.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(est, needed)):
                raise InputError(f"--depth_estimator: {est} has no {needed} (expected a DPTForDepthEstimation "
                                 "folder with its image processor, as written by save_pretrained)")
    if spec.depth and not (g("depth_map") or g("depth_estimator")):
        entry = choice.index.get("depth_estimator")
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None):
            raise UsageError(f"--depth_map / --depth_estimator: {choice.model} has no depth_estimator; pass a depth "
                             "image with --depth_map FILE or a DPT folder with --depth_estimator FOLDER")
    cn_class = (cn_config or {}).get("_class_name") or "ControlNetModel"
    return cn_cache_only, refiner_cache_only, cn_class


def prepare(args: argparse.Namespace) -> Plan:
    """Validate all flags and inputs and resolve defaults, without loading any weights.

    Raises :class:`UsageError` / :class:`InputError` / ``ModelError`` with a message naming the flag or file.
    """
    spec = get_task(args.task)
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731

    # 1. flags that need no file access; training outputs given as inputs
    output_dir = _check_flags(spec, g)
    lora = inputs.check_lora(g("lora")) if g("lora") else None
    cn_config = inputs.check_controlnet(g("controlnet")) if g("controlnet") else None

    # 2. model folder / Hub id (no weights yet)
    replaced = set()
    if g("disable_safety_checker"):
        replaced.add("safety_checker")
    if g("depth_map") or g("depth_estimator"):
        replaced |= {"depth_estimator", "feature_extractor"}
    choice = resolve_model(spec, args, replaced, say, warn)
    cls = pipeline_class_for(spec, choice)
    cn_cache_only, refiner_cache_only, cn_class = _check_model_companions(spec, g, choice, cn_config)
    if lora is not None and not hasattr(cls, "load_lora_weights"):
        raise UsageError(f"--lora: {cls.__name__} (the pipeline of {choice.model}) cannot load LoRA weights")

    # 3. input files
    images, size = _load_images(spec, g)
    embedding = _check_embedding(spec, g, choice)

    # 4. device and dtype
    device = resolve_device(g("device"))
    dtype = resolve_dtype(device, g("dtype"))

    # 5. the pipeline call and the flags it accepts
    params = _named_params(cls.__call__)
    if not spec.text and "prompt" in params:
        raise InputError(f"--model: {choice.model} holds a text-guided {cls.__name__}; the {spec.name} task needs "
                         "an unconditional pipeline such as DDPMPipeline")
    if spec.controlnet and "image" in images and "image" not in params and "control_image" in params:
        images["control_image"] = images.pop("image")  # the SD3 / FLUX ControlNet pipelines' name for it
    user = {name: g(name) for name in ("negative_prompt", "guidance_scale", "strength", "height", "width",
                                        "controlnet_conditioning_scale") if g(name) is not None}
    if spec.image:
        user.pop("height", None), user.pop("width", None)  # applied by resizing the inputs
        if "height" in params and "width" in params:
            user.update(height=size[1], width=size[0])
    for name in user:
        if name not in params:
            raise UsageError(f"--{name}: {cls.__name__} (the pipeline of {choice.model}) does not accept it")
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
    refiner_kwargs = {}
    high_noise_frac = None
    if g("refiner"):
        # Ensemble of experts: the base denoises the first high_noise_frac of the schedule and hands its
        # latents to the refiner, which denoises the rest.
        high_noise_frac = g("high_noise_frac") if g("high_noise_frac") is not None else 0.8
        refiner_kwargs = {k: v for k, v in call.items() if k in ("prompt", "negative_prompt", "guidance_scale",
                                                                 "num_inference_steps", "output_type")}
        refiner_kwargs.update(denoising_start=high_noise_frac)
        call.update(denoising_end=high_noise_frac, output_type="latent")

    seed = g("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        say(f"seed: {seed} (pass --seed {seed} to reproduce)")

    import diffusers

    from .. import __version__

    metadata = {
        "task": spec.name,
        "prompt": g("prompt"),
        "negative_prompt": g("negative_prompt"),
        "num_inference_steps": steps,
        "guidance_scale": guidance if "guidance_scale" in params else None,
        "strength": strength if "strength" in params else None,
        "model": choice.model,
        "model_from": choice.model_from,
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
        "lora": g("lora"),
        "lora_scale": (g("lora_scale") if g("lora_scale") is not None else 1.0) if lora else None,
        "controlnet": g("controlnet"),
        "controlnet_conditioning_scale": (call.get("controlnet_conditioning_scale",
                                                   _default_of(params, "controlnet_conditioning_scale"))
                                          if spec.controlnet else None),
        "refiner": g("refiner"),
        "high_noise_frac": high_noise_frac,
        "base_seed": seed,
        "num_images": g("num_images") or 1,
        "diffusers_version": diffusers.__version__,
        "diffusers_npu_version": __version__,
    }
    components = {}
    if spec.depth and g("depth_map"):
        components.update(depth_estimator=None, feature_extractor=None)  # not needed: skip loading them
    return Plan(
        task=spec.name, model=choice.model, local=choice.local, model_index=choice.index, pipeline_class=cls,
        device=device, dtype=dtype, attention=g("attention", "auto"), compile=bool(g("compile")),
        disable_safety_checker=bool(g("disable_safety_checker")), seed=seed, num_images=g("num_images") or 1,
        output_dir=output_dir, call_kwargs=call, metadata=metadata, components=components,
        depth_estimator=g("depth_estimator"), embedding=embedding, sdxl=choice.sdxl,
        local_files_only=choice.local_files_only, lora=lora,
        lora_scale=1.0 if metadata["lora_scale"] is None else metadata["lora_scale"],
        controlnet=g("controlnet"), controlnet_class=cn_class, controlnet_cache_only=cn_cache_only,
        refiner=g("refiner"),
        refiner_cache_only=refiner_cache_only, refiner_kwargs=refiner_kwargs,
    )


__all__ = ["Plan", "prepare", "resolve_device", "resolve_dtype"]
