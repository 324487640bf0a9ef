"""Inference: the ``test_infer/*.py`` scripts and ``diffusers-npu generate``.

==================== ============================================ ===========================================
task                 script                                       pipeline (SD / SDXL folder)
==================== ============================================ ===========================================
text-to-image        test_infer/text-to-image.py                  whatever model_index.json declares /
                                                                  StableDiffusionXLPipeline (+ --refiner)
img2img              test_infer/text-guide-img-to-img.py          StableDiffusion(XL)Img2ImgPipeline
inpainting           test_infer/text-guide-image-inpainting.py    StableDiffusion(XL)InpaintPipeline
textual-inversion    test_infer/textual-inversion.py              StableDiffusionPipeline (SD only)
depth-to-image       test_infer/text-guide-depth-to-image.py      StableDiffusionDepth2ImgPipeline (SD only)
unconditional        test_infer/unconditional-image-generation.py whatever model_index.json declares
controlnet           test_infer/controlnet.py                     StableDiffusion(XL)ControlNetPipeline
==================== ============================================ ===========================================

Modules, in the order a run uses them:

* :mod:`.tasks`   -- the task table (:data:`TASKS`): flags, required inputs, pipeline classes per task.
* :mod:`.cli`     -- parsers built from the table; :func:`main` for the scripts, ``configure_generate_parser``
  for ``diffusers-npu generate``.
* :mod:`.inputs`  -- images, depth maps, textual-inversion embeddings, LoRA files, ControlNet folders, and
  the base model a training output records.
* :mod:`.models`  -- which model (``--model``, the recorded base model, or the Hub default; offline-aware)
  and which pipeline class (SDXL detection).
* :mod:`.plan`    -- :func:`prepare`: every flag and file validated, defaults resolved, BEFORE any weights
  load.
* :mod:`.loading` and :mod:`.speedup` -- :func:`load_pipeline` (``from_pretrained``, ControlNet, LoRA, device,
  dtype) and THE speed-up function :func:`speed_up` (attention, channels_last, compile), shared with
  ``bench/infer_throughput.py``.
* :mod:`.outputs` and :mod:`.runner` -- one pipeline call per image, PNG + JSON sidecar, all or none (errors,
  Ctrl-C, SIGTERM, full disk).

Importing this package imports only the standard library; torch and diffusers are imported when a run
needs them, so ``--help`` and most input errors answer immediately.
"""
from __future__ import annotations

from ..errors import InputError, ModelError, UsageError
from .cli import add_task_arguments, build_parser, configure_generate_parser, main, parse_args, run_cli
from .inputs import load_image, load_learned_embeds
from .loading import apply_learned_embeds, library_noise_filtered, load_pipeline, torch_dtype
from .outputs import OutputError, OutputWriter, Terminated, to_pil
from .plan import Plan, prepare, resolve_dtype
from .runner import generate, run
from .speedup import speed_up
from .tasks import ATTENTION_MODES, DTYPES, TASKS, TaskSpec, get_task

__all__ = [
    "ATTENTION_MODES",
    "DTYPES",
    "InputError",
    "ModelError",
    "OutputError",
    "OutputWriter",
    "Plan",
    "TASKS",
    "TaskSpec",
    "Terminated",
    "UsageError",
    "add_task_arguments",
    "apply_learned_embeds",
    "build_parser",
    "configure_generate_parser",
    "generate",
    "get_task",
    "library_noise_filtered",
    "load_image",
    "load_learned_embeds",
    "load_pipeline",
    "main",
    "parse_args",
    "prepare",
    "resolve_dtype",
    "run",
    "run_cli",
    "speed_up",
    "to_pil",
    "torch_dtype",
]
