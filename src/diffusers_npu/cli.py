"""The ``diffusers-npu`` command (console script declared in setup.py): ``diffusers-npu COMMAND ...``.

Sub-commands are listed in :data:`COMMANDS`. Adding one is one line there::

    ("train", "diffusers_npu.train.cli:configure_parser", "Fine-tune a model."),

The ``"module:function"`` target is imported only when that sub-command is used (so ``diffusers-npu
--help`` and the other commands stay fast). It is called with the sub-command's (empty)
:class:`argparse.ArgumentParser`, adds its arguments, and registers the handler::

    def configure_parser(parser):
        parser.add_argument("--config", required=True, help="...")
        parser.set_defaults(func=run)      # run(args) -> int exit status (None = 0)

Handlers report user errors by raising :class:`diffusers_npu.inference.UsageError` (or its subclass
``InputError``); :func:`main` prints ``error: <message>`` on stderr and returns 2, without a traceback.
Argument-parsing errors take the same path (the parsers' ``error()`` raises ``UsageError``).
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Optional, Sequence

from . import __version__
from .inference import ArgumentParser, UsageError

# (name, "module:function" that configures the sub-parser, one-line help)
COMMANDS = [
    ("generate", "diffusers_npu.inference:configure_generate_parser",
     "Generate images: text-to-image, img2img, inpainting, textual-inversion, depth-to-image, unconditional."),
    ("train", "diffusers_npu.train.cli:configure_parser",
     "Fine-tune: text_to_image, dreambooth, textual_inversion, controlnet (same flags as examples/)."),
    ("prepare-embedded", "diffusers_npu.train.cli:configure_prepare_parser",
     "Build the embedded offline digits model and data set (done automatically on first use)."),
]


def _load(target: str):
    module, _, func = target.partition(":")
    return getattr(import_module(module), func)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The top-level parser. Only the sub-command named in ``argv`` (if any) gets its arguments."""
    parser = ArgumentParser(
        prog="diffusers-npu",
        description="Stable Diffusion fine-tuning and inference on Ascend NPU, NVIDIA GPU and CPU.",
        epilog="Run 'diffusers-npu COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-npu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, target, help_text in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(target)(command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``diffusers-npu``; returns the exit status (2 for usage/input errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            raise UsageError(f"command {args.command!r} is not available")
        status = func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
