"""The one model-folder check, shared by training (``--pretrained_model_name_or_path``) and inference
(``--model``).

* :func:`looks_local` -- can this only be a local path (a Hub id is ``name`` or ``owner/name``)?
* :func:`read_model_index` / :func:`check_pipeline_folder` -- a local diffusers pipeline folder: it exists, has
  ``model_index.json``, and every component that index lists (or that the caller needs) is a folder there.
* :func:`hub_error` -- turn a failed Hub access into one line that says what to do offline ("pass a local
  folder with --model"), instead of the libraries' five retries and "does not appear to have a file named
  model_index.json".
* :func:`base_model_of` -- the base model recorded in a training output (LoRA, textual inversion,
  ControlNet), so ``generate`` can find it when ``--model`` is omitted.

Only the standard library is imported here.
"""
from __future__ import annotations

import json
import os
import re
import socket
from typing import Iterable, Optional

from .errors import InputError, ModelError

#: File every training output that is not a full pipeline writes beside its weights (see base_model_of).
TRAINING_INFO_NAME = "training_info.json"

_NETWORK_WORDS = ("connection", "connect", "resolve", "network", "offline", "timed out", "timeout",
                  "max retries", "name or service", "temporary failure", "unreachable", "localentrynotfound",
                  "cannot find the requested files in the disk cache", "outgoing traffic has been disabled")


def looks_local(path: str) -> bool:
    """True for things that can only be a local path: ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``C:\\x``, or an
    existing file system entry."""
    path = str(path)
    return (
        os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
        or bool(re.match(r"^[A-Za-z]:", path))
    )


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def single_file_error(path: str, flag: str) -> ModelError:
    """A single-file checkpoint (``model.safetensors`` / ``.ckpt``) where a pipeline folder is needed: how to
    convert it once with diffusers' ``from_single_file`` (which needs the model's configs: from the Hub, or
    offline from a diffusers folder of the same architecture)."""
    out = os.path.splitext(path)[0] + "-diffusers"
    return ModelError(
        f"{flag}: {path} is a single-file checkpoint; this needs a diffusers pipeline folder. Convert it once: "
        f"python -c \"from diffusers import StableDiffusionPipeline as P; P.from_single_file('{path}')"
        f".save_pretrained('{out}')\" (StableDiffusionXLPipeline for an SDXL file; offline add "
        f"config='<a diffusers folder of the same model>'), then pass {out}")


def read_model_index(folder: str, flag: str) -> dict:
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(folder) and folder.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise single_file_error(folder, flag)
    if os.path.isfile(folder):
        raise ModelError(f"{flag}: {folder} is a file; expected a diffusers pipeline folder with model_index.json")
    if not os.path.isdir(folder):
        raise ModelError(f"{flag}: {folder} does not exist (expected a diffusers pipeline folder with "
                         f"model_index.json)")
    if not os.path.isfile(index_path):
        raise ModelError(f"{flag}: {folder} has no model_index.json (expected a diffusers pipeline folder "
                         f"written by save_pretrained)")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{flag}: {index_path} is not valid JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ModelError(f"{flag}: {index_path} must hold a JSON object")
    return index


def check_pipeline_folder(folder: str, flag: str, need: Iterable[str] = (), optional: Iterable[str] = (),
                          class_names: Optional[dict] = None) -> dict:
    """Check a local pipeline folder and return its ``model_index.json``.

    ``need``: components that must be present (a folder each), whatever the index says. Components the
    index lists with a class are required too, except those in ``optional`` (e.g. a safety checker the run
    replaces). ``class_names`` maps a component to the class named in the message (``unet`` ->
    ``UNet2DConditionModel``). Raises :class:`ModelError` naming ``flag``.
    """
    index = read_model_index(folder, flag)
    optional = set(optional)
    names = class_names or {}
    listed = [n for n, v in index.items() if not n.startswith("_") and isinstance(v, (list, tuple))
              and len(v) == 2 and v[0] is not None and n not in optional]
    for name in list(need) + [n for n in listed if n not in need]:
        if not os.path.isdir(os.path.join(folder, name)):
            why = "model_index.json lists it" if name in listed else f"component {names.get(name, name)} is needed"
            hint = " (pass --disable_safety_checker to run without it)" if name == "safety_checker" else ""
            raise ModelError(f"{flag}: {folder} has no '{name}' folder ({why}){hint}")
    return index


def hub_is_reachable(timeout: float = 1.5) -> bool:
    """A quick, honest probe: can this machine open a connection to the Hub? False when offline mode is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_network_error(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__} {exc}".lower()
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)) or any(w in text for w in _NETWORK_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def hub_error(repo_id: str, flag: str, exc: Optional[BaseException] = None, what: str = "model"):
    """The error to raise when ``repo_id`` (not a local folder) could not be loaded from the Hub."""
    offline = exc is None or looks_like_network_error(exc) or not hub_is_reachable()
    if offline:
        return ModelError(f"{flag}: {repo_id!r} is not a local folder and the Hugging Face Hub cannot be reached "
                          f"(no network, or HF_HUB_OFFLINE is set); pass a local {what} folder with {flag}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"{flag}: could not load {repo_id!r} from the Hugging Face Hub: {first}")


def base_model_of(folder: str) -> Optional[str]:
    """The base model a training output was trained on, if the output records it (``training_info.json``
    with ``base_model``, or the older ``lora_info.json``); None otherwise."""
    for name in (TRAINING_INFO_NAME, "lora_info.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    base = json.load(f).get("base_model")
            except (OSError, ValueError, AttributeError):
                continue
            if base:
                return str(base)
    return None


#: pipeline class (``_class_name`` of model_index.json) -> model family. A family is what a training script
#: or an inference task is written for: ``sd`` (SD 1.x / 2.x UNet), ``sdxl`` (UNet + two text encoders),
#: ``sd3`` (MMDiT transformer, three text encoders), ``flux`` (FLUX.1 transformer, CLIP + T5).
FAMILY_OF_PIPELINE = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl", "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3", "StableDiffusion3InpaintPipeline": "sd3",
    "StableDiffusion3ControlNetPipeline": "sd3", "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux", "FluxControlNetPipeline": "flux",
}
#: the denoiser component that tells the families apart when the class name is unknown
_FAMILY_BY_COMPONENTS = (("flux", ("transformer", "text_encoder_2"), ("text_encoder_3",)),
                         ("sd3", ("transformer", "text_encoder_3"), ()),
                         ("sdxl", ("unet", "text_encoder_2"), ()),
                         ("sd", ("unet",), ("text_encoder_2",)))


def model_family(index: dict) -> Optional[str]:
    """``sd`` / ``sdxl`` / ``sd3`` / ``flux`` for a pipeline's ``model_index.json`` (None when unknown): by its
    class name, else by which components it lists."""
    fam = FAMILY_OF_PIPELINE.get(str(index.get("_class_name", "")))
    if fam:
        return fam
    present = {n for n, v in index.items() if not n.startswith("_") and isinstance(v, (list, tuple))
               and len(v) == 2 and v[0] is not None}
    for family, need, absent in _FAMILY_BY_COMPONENTS:
        if all(n in present for n in need) and not any(n in present for n in absent):
            return family
    return None


#: family -> the training script for it, named when a pipeline of another family is given to a script
FAMILY_SCRIPT = {"sd": "examples/text_to_image/train_text_to_image.py",
                 "sdxl": "examples/text_to_image/train_text_to_image_sdxl.py",
                 "sd3": "examples/dreambooth/train_dreambooth_sd3.py",
                 "flux": "examples/dreambooth/train_dreambooth_flux.py"}
FAMILY_NAME = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3",
               "flux": "FLUX.1"}


def check_family(path: str, flag: str, family: str, script: str) -> None:
    """Refuse, in one line naming the script to use, a local pipeline folder of another family than the one
    ``script`` trains. Folders that cannot be read are left to the folder check, which names what is wrong."""
    index_path = os.path.join(os.path.expanduser(str(path)), "model_index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return
    found = model_family(index) if isinstance(index, dict) else None
    if found is None or found == family:
        return
    what = f"{index['_class_name']} folder" if index.get("_class_name") else "pipeline folder"
    raise ModelError(f"{flag}: {path} is a {what} ({FAMILY_NAME[found]}); {script} trains {FAMILY_NAME[family]} "
                     f"models: use {FAMILY_SCRIPT[found]}")


def require_existing(path: str, flag: str, kind: str = "file") -> str:
    if not os.path.exists(path):
        raise InputError(f"{flag}: {path} does not exist (expected a {kind})")
    return path


__all__ = [
    "TRAINING_INFO_NAME",
    "base_model_of",
    "FAMILY_SCRIPT",
    "check_family",
    "check_pipeline_folder",
    "hub_error",
    "hub_is_reachable",
    "looks_like_network_error",
    "looks_local",
    "model_family",
    "read_model_index",
    "single_file_error",
    "require_existing",
]
