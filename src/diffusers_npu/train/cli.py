"""``diffusers-npu train TASK [flags]`` and ``diffusers-npu prepare-embedded``."""
from __future__ import annotations

import argparse
import json
from importlib import import_module

# task name -> "module:class"; imported only when used
TASKS = {
    "text_to_image": "diffusers_npu.train.tasks.text_to_image:TextToImageTask",
    "dreambooth": "diffusers_npu.train.tasks.dreambooth:DreamBoothTask",
    "textual_inversion": "diffusers_npu.train.tasks.textual_inversion:TextualInversionTask",
    "controlnet": "diffusers_npu.train.tasks.controlnet:ControlNetTask",
}


def task_class(name: str):
    module, _, cls = TASKS[name].partition(":")
    return getattr(import_module(module), cls)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(TASKS), help="what to train")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="the task's flags (see 'diffusers-npu train TASK --help')")
    parser.set_defaults(func=run)


def run(args) -> int:
    from . import main

    return main(task_class(args.task), args.flags)


def configure_prepare_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache folder has them")
    parser.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from ..embedded import prepare

    print(json.dumps(prepare(force=args.force), indent=1))
    return 0
