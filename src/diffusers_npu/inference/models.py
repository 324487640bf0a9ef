"""Which model and which pipeline class a run uses -- decided from files only, before any weights load.

* :func:`resolve_model` -- ``--model`` as given; else the base model a training output records (``--lora``,
  ``--learned_embeds``, ``--controlnet`` pointing at a LoRA / textual-inversion / ControlNet output with
  ``training_info.json``); else the task's Hub default. Local folders are checked with THE model-folder check
  (:func:`diffusers_npu.model_folder.check_pipeline_folder`); Hub ids are looked up once, and offline a clear
  "pass a local folder with --model" replaces the libraries' retries.
* :func:`pipeline_class_for` -- the model family (``model_folder.model_family``: SD, SDXL, SD3, FLUX) picks
  the task's pipeline class for that family.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Iterable, Optional

from ..errors import InputError, ModelError, UsageError
from ..model_folder import check_pipeline_folder, hub_error, hub_is_reachable, looks_local, model_family
from .inputs import read_json, recorded_base_model
from .tasks import TASKS, TaskSpec


@dataclass
class ModelChoice:
    model: str  # local folder or Hub id
    local: bool
    index: dict  # model_index.json
    sdxl: bool
    model_from: Optional[str] = None  # the training_info.json / lora_info.json that named the model
    local_files_only: bool = False  # a Hub id found only in the local cache (offline)
    family: Optional[str] = None  # sd / sdxl / sd3 / flux (model_folder.model_family), None when unknown


#: how messages name the model families
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3",
                "flux": "FLUX.1"}
DIT_FAMILIES = ("sd3", "flux")


def is_sdxl(index: dict) -> bool:
    """A Stable Diffusion XL pipeline folder (``model_folder.model_family`` says ``sdxl``)."""
    return model_family(index) == "sdxl"


def _choice(model: str, local: bool, index: dict, model_from=None, cache_only: bool = False) -> ModelChoice:
    family = model_family(index)
    return ModelChoice(model, local, index, family == "sdxl", model_from, cache_only, family)


def _cached_file(repo_id: str, filename: str) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, filename)
    except Exception:  # malformed id or no cache: treated as not cached
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _cached_index(repo_id: str) -> Optional[str]:
    return _cached_file(repo_id, "model_index.json")


def fetch_hub_index(repo_id: str, flag: str = "--model", default: bool = False, filename: str = "model_index.json",
                    what: str = "pipeline"):
    """``(model_index.json, local_files_only)`` of a Hub id (``filename``: another JSON file of the repository,
    e.g. a ControlNet's config.json). Offline, only the local Hugging Face cache is used, and a miss says so in
    one line instead of retrying."""
    def failed(exc=None):
        err = hub_error(repo_id, flag, exc, what=what)
        if default:  # the user never typed this id: say where it came from
            err = ModelError(str(err).replace(repr(repo_id), f"{repo_id!r} (the default)", 1))
        return err

    if not hub_is_reachable():
        cached = _cached_index(repo_id) if filename == "model_index.json" else _cached_file(repo_id, filename)
        if cached is None:
            raise failed()
        return read_json(cached, flag), True
    try:
        from huggingface_hub import hf_hub_download

        return read_json(hf_hub_download(repo_id, filename), flag), False
    except Exception as exc:  # unknown repo, gated, network dropped meanwhile
        raise failed(exc) from None


def _base_from_outputs(args, say) -> tuple:
    """(base model, info file) recorded by the training outputs given on the command line, or (None, None)."""
    found = {}
    for flag, name in (("--lora", "lora"), ("--learned_embeds", "learned_embeds"), ("--controlnet", "controlnet")):
        path = getattr(args, name, None)
        if path and os.path.exists(path):
            hit = recorded_base_model(flag, path)
            if hit:
                found[flag] = hit
    bases = {os.path.realpath(b) if os.path.exists(b) else b for b, _ in found.values()}
    if len(bases) > 1:
        listed = "; ".join(f"{flag} was trained on {base} ({info})" for flag, (base, info) in found.items())
        raise UsageError(f"--model not given and the training outputs disagree: {listed}; pass --model")
    if not found:
        return None, None
    base, info = next(iter(found.values()))
    if looks_local(base) and not os.path.isdir(base):
        raise InputError(f"--model not given; {info} names the base model {base}, which is not a folder here; "
                         "pass --model with the base model's folder")
    say(f"--model not given: using the base model {base} recorded in {info}")
    return base, info


def _warn_other_base(args, model: str, warn) -> None:
    """A training output used with an explicit --model other than the one it was trained on: say so."""
    for flag, name in (("--lora", "lora"), ("--learned_embeds", "learned_embeds"), ("--controlnet", "controlnet")):
        path = getattr(args, name, None)
        hit = recorded_base_model(flag, path) if path and os.path.exists(path) else None
        if hit and os.path.exists(hit[0]) and os.path.realpath(hit[0]) != os.path.realpath(model):
            warn(f"{flag} was trained on {hit[0]} (see {hit[1]}), but --model is {model}")


def resolve_model(spec: TaskSpec, args, optional: Iterable[str], say, warn) -> ModelChoice:
    """Decide and check the model of this run (see the module docstring). ``optional``: components the run
    replaces, which need not exist in the folder."""
    given = getattr(args, "model", None)
    model_from = None
    if given:
        model = str(given)
    else:
        model, model_from = _base_from_outputs(args, say)
        model = model or spec.default_model
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded) or looks_local(model):
        index = check_pipeline_folder(expanded, "--model", optional=optional)
        if given:
            _warn_other_base(args, expanded, warn)
        return _choice(expanded, True, index, model_from)
    index, cache_only = fetch_hub_index(model, "--model", default=not given and model_from is None)
    return _choice(model, False, index, model_from, cache_only)


def pipeline_class(name: str, flag: str = "--model"):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not inspect.isclass(cls):
        raise InputError(f"{flag}: model_index.json declares pipeline class {name!r}, which diffusers "
                         f"{diffusers.__version__} does not provide")
    return cls


def pipeline_class_for(spec: TaskSpec, choice: ModelChoice):
    """The diffusers pipeline class this task loads for this model."""
    if choice.sdxl:
        if spec.sdxl_class is None:
            raise UsageError(f"--model: {choice.model} is a Stable Diffusion XL pipeline; the {spec.name} task "
                             "supports Stable Diffusion 1.x/2.x folders only")
        if choice.index.get("requires_aesthetics_score") and not (spec.image and not spec.controlnet):
            # A refiner's UNet is conditioned on an aesthetic score that only the img2img/inpaint pipelines send.
            raise UsageError(f"--model: {choice.model} is an SDXL refiner (conditioned on an aesthetic score); use it "
                             "with --refiner, or with the img2img / inpainting task")
        return pipeline_class(spec.sdxl_class)
    if choice.family in DIT_FAMILIES:
        name = spec.class_for(choice.family)
        if name is None:
            able = ", ".join(s.name for s in TASKS.values() if s.class_for(choice.family))
            raise UsageError(f"--model: {choice.model} is a {FAMILY_NAMES[choice.family]} pipeline; the {spec.name} "
                             f"task does not support it (tasks that do: {able})")
        return pipeline_class(name)
    name = spec.pipeline_class or choice.index.get("_class_name")
    if not name:
        raise InputError(f"--model: {choice.model}/model_index.json has no _class_name")
    return pipeline_class(name)


def check_unet_channels(spec: TaskSpec, choice: ModelChoice) -> None:
    if not choice.local:
        return
    unet_cfg = os.path.join(choice.model, "unet", "config.json")
    if not os.path.isfile(unet_cfg):
        return
    channels = read_json(unet_cfg, "--model").get("in_channels")
    message = spec.channel_error(choice.model, channels, choice.sdxl) if channels is not None else None
    if message:
        raise InputError(message)


def component_config(choice: ModelChoice, component: str) -> dict:
    """``<model>/<component>/config.json`` of a local folder ({} when absent or for Hub ids)."""
    if not choice.local:
        return {}
    path = os.path.join(choice.model, component, "config.json")
    return read_json(path, "--model") if os.path.isfile(path) else {}


#: ControlNet class (config.json ``_class_name``) -> the model family it steers (ControlNetModel: sd or sdxl)
CONTROLNET_FAMILY = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}


def controlnet_family(config: dict) -> str:
    name = config.get("_class_name") or "ControlNetModel"
    if name in CONTROLNET_FAMILY:
        return CONTROLNET_FAMILY[name]
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def check_controlnet_matches(config: dict, path: str, choice: ModelChoice) -> None:
    """A ControlNet must be of the model's family (SD / SDXL / SD3 / FLUX); its conditioning widths must agree
    with the denoiser's (cross attention for UNets, the joint attention / text width for transformers)."""
    cn_family = controlnet_family(config)
    if cn_family in DIT_FAMILIES or choice.family in DIT_FAMILIES:
        if cn_family != choice.family:
            model_kind = FAMILY_NAMES.get(choice.family, str(choice.index.get("_class_name")))
            raise InputError(f"--controlnet: {path} is a {FAMILY_NAMES[cn_family]} ControlNet "
                             f"({config.get('_class_name', 'ControlNetModel')}) but --model {choice.model} is a "
                             f"{model_kind} pipeline; use a ControlNet trained for that base model")
        want = component_config(choice, "transformer")
        for key in ("joint_attention_dim", "in_channels"):
            if key in want and key in config and want[key] != config[key]:
                raise InputError(f"--controlnet: {path} has {key} {config[key]} but the transformer of "
                                 f"{choice.model} has {want[key]} (trained for a different base model?)")
        return
    cn_sdxl = cn_family == "sdxl"
    if cn_sdxl != choice.sdxl:
        kinds = ("a Stable Diffusion XL", "a Stable Diffusion 1.x/2.x")
        raise InputError(f"--controlnet: {path} is {kinds[not cn_sdxl]} ControlNet but --model {choice.model} is "
                         f"{kinds[not choice.sdxl]} pipeline; use a ControlNet trained for that base model")
    unet_dim = component_config(choice, "unet").get("cross_attention_dim")
    cn_dim = config.get("cross_attention_dim")
    if unet_dim is not None and cn_dim is not None and unet_dim != cn_dim:
        raise InputError(f"--controlnet: {path} has cross_attention_dim {cn_dim} but the UNet of {choice.model} "
                         f"has {unet_dim} (trained for a different base model?)")


def check_refiner(path: str) -> bool:
    """``--refiner``: an SDXL pipeline folder or Hub id (usually a StableDiffusionXLImg2ImgPipeline). Returns
    whether it must be loaded from the local Hub cache only (offline)."""
    cache_only = False
    if os.path.isdir(os.path.expanduser(path)) or looks_local(path):
        index = check_pipeline_folder(os.path.expanduser(path), "--refiner")
    else:
        index, cache_only = fetch_hub_index(path, "--refiner")
    if not is_sdxl(index):
        raise InputError(f"--refiner: {path} is a {index.get('_class_name')} folder; a refiner must be a Stable "
                         "Diffusion XL pipeline (e.g. stable-diffusion-xl-refiner-1.0)")
    return cache_only


__all__ = [
    "CONTROLNET_FAMILY",
    "DIT_FAMILIES",
    "FAMILY_NAMES",
    "ModelChoice",
    "check_controlnet_matches",
    "controlnet_family",
    "check_refiner",
    "check_unet_channels",
    "component_config",
    "fetch_hub_index",
    "is_sdxl",
    "pipeline_class",
    "pipeline_class_for",
    "resolve_model",
]
