"""Pipeline loading: ``from_pretrained`` (with a ControlNet or another depth estimator where the task has
one), LoRA weights, textual-inversion tokens, device and dtype, then :func:`~.speedup.speed_up`.

:func:`load_pipeline` is what ``generate``, the ``test_infer`` scripts and the inference benchmark call.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from typing import Any, Dict, List, Optional

from ..errors import InputError, UsageError
from ..model_folder import hub_error, looks_local
from .speedup import speed_up
from .tasks import get_task


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Library warnings that are false alarms for what these pipelines do, filtered by exact text:
# - diffusers' own SDXL pipelines upcast their VAE with .to(float32) (force_upcast), and ModelMixin.to then
#   warns about casting "directly with to()" -- printed 2-4 times per image;
# - a LoRA file with UNet weights only makes load_lora_weights warn once per text encoder, while saying
#   itself that this "is safe to ignore";
# - a LoRA that does not fit is logged with its whole multi-line error before it is raised; load_lora
#   reports it as one line.
_LORA_OK = "This is safe to ignore if LoRA state dict didn't originally have"
_NOISE = {
    "diffusers.models.modeling_utils": ("that should be kept in float32",),
    "diffusers.loaders.lora_base": (_LORA_OK,),
    "diffusers.loaders.peft": (_LORA_OK, "was unsuccessful with the following error"),
}


class _DropText(logging.Filter):
    def __init__(self, texts):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


@contextlib.contextmanager
def library_noise_filtered():
    """While active, the false-alarm library warnings listed in ``_NOISE`` are dropped."""
    installed = []
    for name, text in _NOISE.items():
        flt = _DropText(text)
        logging.getLogger(name).addFilter(flt)
        installed.append((name, flt))
    try:
        yield
    finally:
        for name, flt in installed:
            logging.getLogger(name).removeFilter(flt)


def torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since diffusers 0.42 (``torch_dtype`` deprecated)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _first_line(exc: BaseException) -> str:
    """The line of an error that says what went wrong (a state-dict error's first size mismatch)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    return (mismatch or lines or [type(exc).__name__])[0]


def _load_error(flag: str, source: str, what: str, exc: BaseException):
    if not looks_local(source):
        return hub_error(source, flag, exc, what=what)
    return InputError(f"{flag}: cannot load a {what} from {source}: {_first_line(exc)}")


def _init_params(pipeline_class, model: str) -> Dict[str, Any]:
    import diffusers

    from .models import pipeline_class as resolve_class

    if pipeline_class is not diffusers.DiffusionPipeline:
        return dict(inspect.signature(pipeline_class.__init__).parameters)
    try:  # the class is only known from model_index.json
        declared = diffusers.DiffusionPipeline.load_config(model).get("_class_name")
        return dict(inspect.signature(resolve_class(declared).__init__).parameters)
    except Exception:  # unknown: pass the safety-checker switches anyway (ignored if unexpected)
        return {"safety_checker": None, "requires_safety_checker": None}


def saved_variant(path: str) -> Optional[str]:
    """The variant of a local model folder that holds only one (``diffusion_pytorch_model.bf16.safetensors``, as
    ``--save_weight_dtype bf16`` of the FLUX ControlNet task writes it), else None."""
    import os
    import re

    if not os.path.isdir(path):
        return None
    names = os.listdir(path)
    if any(re.fullmatch(r"diffusion_pytorch_model\.(safetensors|bin)(\.index\.json)?", n) for n in names):
        return None
    found = {m.group(1) for n in names for m in [re.fullmatch(r"diffusion_pytorch_model\.(\w+)\.safetensors", n)] if m}
    return found.pop() if len(found) == 1 else None


def load_controlnet(path: str, dtype: str, local_files_only: bool = False, class_name: str = "ControlNetModel"):
    """``class_name``: ControlNetModel, SD3ControlNetModel or FluxControlNetModel (its config's _class_name); a
    folder that holds one variant's weights only is loaded as that variant."""
    import diffusers

    cls = getattr(diffusers, class_name)
    try:
        return cls.from_pretrained(path, local_files_only=local_files_only, variant=saved_variant(path),
                                   **{dtype_kwarg(): torch_dtype(dtype)})
    except (OSError, ValueError, RuntimeError) as exc:
        raise _load_error("--controlnet", path, class_name, exc) from None


def load_lora(pipe, lora: tuple, scale: float = 1.0) -> None:
    """Load ``lora`` = (folder, weight file name) into ``pipe`` as adapter "lora" at ``scale``."""
    folder, name = lora
    if not hasattr(pipe, "load_lora_weights"):
        raise UsageError(f"--lora: {type(pipe).__name__} cannot load LoRA weights")
    try:
        pipe.load_lora_weights(folder, weight_name=name, adapter_name="lora")
        pipe.set_adapters("lora", adapter_weights=scale)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"--lora: cannot load {folder}/{name} into {type(pipe).__name__}: "
                         f"{_first_line(exc)} (trained for a different base model?)") from None


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


def _no_fp32_upcast(pipe, dtype: str) -> None:
    """SDXL VAEs carry ``force_upcast`` (the fp16 overflow fix): in fp32 the upcast is a no-op cast, so it is
    switched off rather than run (and warned about) on every image."""
    vae = getattr(pipe, "vae", None)
    if dtype == "fp32" and vae is not None and getattr(vae.config, "force_upcast", False):
        vae.register_to_config(force_upcast=False)


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
    controlnet: Optional[str] = None,
    controlnet_class: str = "ControlNetModel",
    lora: Optional[tuple] = None,
    lora_scale: float = 1.0,
    local_files_only: bool = False,
    controlnet_local_files_only: bool = False,
    channels_last: Optional[bool] = None,
    speed: bool = True,
):
    """Load a pipeline for ``task`` from a local folder or Hub id, ready to call on ``device``.

    ``pipeline_class`` defaults to the task's class (or ``DiffusionPipeline``, i.e. whatever
    model_index.json declares). ``disable_safety_checker`` loads with ``safety_checker=None`` and
    ``requires_safety_checker=False`` where the class has them. ``depth_estimator`` is a local DPT folder
    that replaces the model's own; ``controlnet`` a folder or Hub id of ``controlnet_class``; ``lora`` a
    ``(folder, weight name)`` pair from :func:`~.inputs.check_lora`, applied at ``lora_scale``.
    ``components`` are passed on to ``from_pretrained`` (e.g. ``{"depth_estimator": None}``). With ``speed``
    (the default) :func:`~.speedup.speed_up` is applied with ``attention``, ``channels_last``, ``compile``.
    """
    import diffusers

    from .. import device as _device
    from .models import pipeline_class as resolve_class

    spec = get_task(task)
    if pipeline_class is None:
        pipeline_class = resolve_class(spec.pipeline_class) if spec.pipeline_class else diffusers.DiffusionPipeline
    init_params = _init_params(pipeline_class, model)
    kwargs = dict(components or {})
    kwargs[dtype_kwarg()] = torch_dtype(dtype)
    if local_files_only:
        kwargs["local_files_only"] = True
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
    if controlnet:
        kwargs["controlnet"] = load_controlnet(controlnet, dtype, controlnet_local_files_only, controlnet_class)

    _device.apply_device_settings(device)
    try:
        pipe = pipeline_class.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:  # missing/corrupt files, incompatible components
        raise _load_error("--model", model, pipeline_class.__name__, exc) from None
    if lora is not None:
        load_lora(pipe, lora, lora_scale)
    _no_fp32_upcast(pipe, dtype)
    pipe = pipe.to(device)
    if speed:
        speed_up(pipe, device, attention=attention, channels_last=channels_last, compile=compile)
    return pipe


def load_refiner(folder: str, device: str, dtype: str, attention: str = "auto", compile: bool = False,
                 channels_last: Optional[bool] = None, local_files_only: bool = False):
    """The SDXL refiner (a folder or Hub id) as a StableDiffusionXLImg2ImgPipeline with the base's speed-ups."""
    import diffusers

    from .. import device as _device

    _device.apply_device_settings(device)
    try:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder, local_files_only=local_files_only, **{dtype_kwarg(): torch_dtype(dtype)})
    except (OSError, ValueError) as exc:
        raise _load_error("--refiner", folder, "StableDiffusionXLImg2ImgPipeline", exc) from None
    _no_fp32_upcast(pipe, dtype)
    pipe = pipe.to(device)
    speed_up(pipe, device, attention=attention, channels_last=channels_last, compile=compile, quiet=True)
    return pipe


__all__ = ["apply_learned_embeds", "dtype_kwarg", "library_noise_filtered", "load_controlnet", "load_lora", "load_pipeline", "load_refiner",
           "torch_dtype"]
