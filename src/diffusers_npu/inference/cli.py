"""Command line of the inference tasks: the ``test_infer/*.py`` scripts (:func:`main`) and
``diffusers-npu generate TASK`` (:func:`configure_generate_parser`) share one flag set per task, built from
the task table (:mod:`.tasks`). Only the standard library is imported here, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from typing import Optional, Sequence

from ..cliutil import ArgumentParser, HelpFormatter, multiple_of_8, nonneg_int, number, positive_int
from .tasks import ATTENTION_MODES, DEVICES, DTYPES, TASKS, TaskSpec, get_task


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Effective defaults shown once (cliutil), description and example kept as written, and Hub ids and
    flag names never split at a hyphen (``runwayml/stable-`` / ``diffusion-v1-5`` cannot be copied)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


# The project's value types (cliutil); the old names stay for the code below.
_positive_int, _nonnegative_int, _size = positive_int, nonneg_int, multiple_of_8


def _float(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False):
    return number(float, lo, hi, lo_open, hi_open)


def _model_help(spec: TaskSpec) -> str:
    outputs = [f for f, on in (("--lora", spec.lora), ("--learned_embeds", spec.embeds),
                               ("--controlnet", spec.controlnet)) if on]
    recorded = (f"the base model recorded in the training_info.json of {' / '.join(outputs)}, else "
                if outputs else "")
    origin = "" if spec.controlnet else ", as in the original script"  # ControlNet had no original script
    return ("local pipeline folder (with model_index.json, as written by save_pretrained) or a Hugging Face Hub id "
            f"(default: {recorded}{spec.default_model}{origin}; a Hub id needs network access or the local Hub "
            "cache)")


def _add_model_output(parser, spec: TaskSpec) -> None:
    g = parser.add_argument_group("model and output")
    g.add_argument("--model", default=None, metavar="FOLDER_OR_ID", help=_model_help(spec))
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


def _add_text(parser, spec: TaskSpec) -> None:
    t = parser.add_argument_group("text guidance")
    t.add_argument("--prompt", default=None, metavar="TEXT",
                   help=f"the text that guides generation (required), e.g. {spec.example_prompt!r}")
    t.add_argument("--negative_prompt", default=None, metavar="TEXT",
                   help="what the image should not show (only for pipelines that accept it; LDM does not)")
    t.add_argument("--guidance_scale", type=_float(lo=0.0), default=None, metavar="G",
                   help="classifier-free guidance scale, >= 0; 1 means no guidance "
                   "(default: the pipeline's default, 7.5 for Stable Diffusion, 5 for SDXL, 1.0 for LDM)")


def _add_images(parser, spec: TaskSpec) -> None:
    i = parser.add_argument_group("images and size")
    if spec.image:
        i.add_argument("--image", default=None, metavar="FILE", help=spec.image_help)
    if spec.mask:
        i.add_argument("--mask_image", default=None, metavar="FILE",
                       help="mask image of the same size as --image (required): white = repaint, black = keep")
    if spec.strength:
        i.add_argument("--strength", type=_float(lo=0.0, hi=1.0, lo_open=True), default=None, metavar="X",
                       help="in (0, 1]: how much of --image is re-noised; 1 ignores it entirely (default: the "
                       "pipeline's default, 0.8 for img2img/depth, 1.0 for inpainting; SDXL: 0.3 / 0.9999)")
    size_help = ("output {0}, a multiple of 8; the inputs are resized to it (default: the input image's {0}, "
                 "rounded down to a multiple of 8)" if spec.image
                 else "output {0}, a multiple of 8 (default: the model's native size)")
    i.add_argument("--height", type=_size, default=None, metavar="PX", help=size_help.format("height"))
    i.add_argument("--width", type=_size, default=None, metavar="PX", help=size_help.format("width"))


def _add_task_inputs(parser, spec: TaskSpec) -> None:
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
    if spec.controlnet:
        c = parser.add_argument_group("controlnet")
        c.add_argument("--controlnet", default=None, metavar="FOLDER_OR_ID",
                       help="the ControlNetModel (required): our ControlNet training output or any diffusers "
                       "ControlNet folder; an SDXL ControlNet needs an SDXL --model")
        c.add_argument("--controlnet_conditioning_scale", type=_float(lo=0.0), default=None, metavar="X",
                       help="how strongly the ControlNet steers, >= 0 (default: the pipeline's default, 1.0)")
    if spec.lora:
        lo = parser.add_argument_group("LoRA")
        lo.add_argument("--lora", default=None, metavar="FILE_OR_FOLDER",
                        help="LoRA weights loaded with the pipeline's load_lora_weights: our LoRA training output "
                        "(a folder with pytorch_lora_weights.safetensors) or a .safetensors file")
        lo.add_argument("--lora_scale", type=_float(lo=0.0), default=None, metavar="X",
                        help="weight of the LoRA update, >= 0; 0 gives the base model's image (default: 1.0)")
    if spec.refiner:
        r = parser.add_argument_group("SDXL refiner")
        r.add_argument("--refiner", default=None, metavar="FOLDER",
                       help="SDXL only: a refiner pipeline folder (e.g. stable-diffusion-xl-refiner-1.0) that "
                       "finishes each image (ensemble of experts)")
        r.add_argument("--high_noise_frac", type=_float(lo=0.0, hi=1.0, lo_open=True, hi_open=True), default=None,
                       metavar="F", help="with --refiner: the fraction of the denoising done by the base model, "
                       "in (0, 1); the refiner does the rest (default: 0.8)")


def _add_device(parser, spec: TaskSpec) -> None:
    r = parser.add_argument_group("device and speed")
    r.add_argument("--device", default=None, choices=DEVICES,
                   help="where to run (default: auto = npu if available, else cuda, else cpu; the "
                   "DIFFUSERS_NPU_DEVICE environment variable also sets it)")
    r.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights/compute precision (default: fp16 on npu/cuda, fp32 on cpu). fp16 is refused "
                   "on cpu; bf16 only where the device supports it")
    r.add_argument("--attention", default="auto", choices=ATTENTION_MODES,
                   help="attention implementation for the UNet/VAE/ControlNet (diffusers_npu.attention): auto "
                   "(fused kernel on NPU/GPU, fp32-softmax elsewhere for half precision), flash, upcast, default "
                   "(stock diffusers) (default: auto)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (channels_last; mode max-autotune with CUDA graphs on cuda). "
                   "The first image pays the compile time; on cpu allowed but slow to warm up; on npu ignored")
    if spec.safety:
        r.add_argument("--disable_safety_checker", action="store_true",
                       help="load without the NSFW safety checker (no model_index.json edit needed; also fine "
                       "if the folder has none)")


def add_task_arguments(parser: argparse.ArgumentParser, task: str) -> argparse.ArgumentParser:
    """Add the flags of ``task`` to ``parser`` (a fresh parser or a sub-command parser)."""
    spec = get_task(task)
    _add_model_output(parser, spec)
    if spec.text:
        _add_text(parser, spec)
    if spec.image or spec.size:
        _add_images(parser, spec)
    _add_task_inputs(parser, spec)
    _add_device(parser, spec)
    parser.set_defaults(task=spec.name)
    return parser


def epilog(spec: TaskSpec) -> str:
    prompt = f" --prompt {json.dumps(spec.example_prompt)}" if spec.text else ""
    tail = f"--model path/to/local/pipeline{prompt}{spec.example} --seed 0"
    return ("Each image is written as <output_dir>/<task>-seed<S>.png plus a .json sidecar holding every parameter.\n"
            f"example:\n  python test_infer/{spec.script} {tail}\n"
            f"same as:\n  diffusers-npu generate {spec.name} {tail}")


def build_parser(task: str, parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The complete argument parser of a task's script (``parser`` given: add the flags to it)."""
    spec = get_task(task)
    if parser is None:
        parser = ArgumentParser(prog=f"python test_infer/{spec.script}", description=textwrap.fill(spec.description, 100),
                                epilog=epilog(spec), formatter_class=_Formatter)
    return add_task_arguments(parser, spec.name)


def parse_args(task: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with the task's parser. Raises ``UsageError``."""
    return build_parser(task).parse_args(argv)


def main(task: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the task scripts: 0; 2 after ``error: ...`` for bad input or a full disk; 130 / 143
    after Ctrl-C / SIGTERM (every file of the run removed again)."""
    from .runner import entry

    return entry(lambda: parse_args(task, argv))


def run_cli(args: argparse.Namespace) -> int:
    """``diffusers-npu generate`` handler (project errors are reported by ``diffusers_npu.cli.main``)."""
    from .runner import run, stop_lines

    return stop_lines(lambda: run(args))


def configure_generate_parser(parser: argparse.ArgumentParser) -> None:
    """Fill the ``diffusers-npu generate`` sub-parser: one sub-command per task (script names as aliases)."""
    tasks = parser.add_subparsers(dest="task_name", metavar="TASK", required=True,
                                  help=f"one of: {', '.join(TASKS)}")
    for spec in TASKS.values():
        sub = tasks.add_parser(
            spec.name, aliases=list(spec.aliases), help=spec.description.split(":")[0].split(" (")[0],
            description=textwrap.fill(spec.description, 100), epilog=epilog(spec), formatter_class=_Formatter,
            prog=f"diffusers-npu generate {spec.name}",
        )
        add_task_arguments(sub, spec.name)
        sub.set_defaults(func=run_cli)


__all__ = ["add_task_arguments", "build_parser", "configure_generate_parser", "epilog", "main", "parse_args",
           "run_cli"]
