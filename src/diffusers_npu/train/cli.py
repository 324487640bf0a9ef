"""``diffusers-npu train TASK [flags]`` and ``diffusers-npu prepare-embedded``."""
from __future__ import annotations

import argparse
import json


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .registry import get_task, task_names

    lines = [f"  {n:<22} {get_task(n).description}" for n in task_names()]
    parser.description = "Fine-tune a model with one training task.\n\ntasks:\n" + "\n".join(lines)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("task", metavar="TASK", help="the task to train (text_to_image and text-to-image both work)")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="the task's flags (see 'diffusers-npu train TASK --help')")
    parser.set_defaults(func=run)


def run(args) -> int:
    from . import main, task_class

    return main(task_class(args.task), args.flags)


def configure_prepare_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache folder has them")
    parser.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from .. import embedded, embedded_sdxl

    made = {"sd": embedded.prepare(force=args.force), "sdxl": embedded_sdxl.prepare(force=args.force)}
    print(json.dumps(made, indent=1))
    return 0
