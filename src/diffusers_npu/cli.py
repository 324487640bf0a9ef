"""The ``diffusers-npu`` command (console script declared in setup.py): ``diffusers-npu COMMAND ...``.

Sub-commands are listed in :data:`COMMANDS`. Adding one is one line there::

    ("train", "diffusers_npu.train.cli:configure_parser", "Fine-tune a model."),

The ``"module:function"`` target is imported only when that sub-command is used (so ``diffusers-npu
--help`` and the other commands stay fast, and training never imports the inference package). It is called
with the sub-command's (empty) parser, adds its arguments, and registers the handler::

    def configure_parser(parser):
        parser.add_argument("--config", required=True, help="...")
        parser.set_defaults(func=run)      # run(args) -> int exit status (None = 0)

Handlers report user errors by raising a :class:`diffusers_npu.errors.DiffusersNpuError`; :func:`main` prints
``error: <message>`` on stderr and returns its exit code, without a traceback.
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Optional, Sequence

from . import __version__
from .cliutil import ArgumentParser, run_main
from .errors import UsageError

# (name, "module:function" that configures the sub-parser, one-line help)
COMMANDS = [
    ("generate", "diffusers_npu.inference.cli:configure_generate_parser",
     "Generate images: text-to-image, img2img, inpainting, textual-inversion, depth-to-image, unconditional, "
     "controlnet (SD and SDXL)."),
    ("train", "diffusers_npu.train.cli:configure_parser",
     "Fine-tune a model with one training task (same flags as the scripts in examples/)."),
    ("launch", "diffusers_npu.launch:configure_parser",
     "Run a training task on 1 or N devices / nodes the ModelZoo way: log file, live progress line, "
     "summary lines and CaseName.log."),
    ("selfcheck", "diffusers_npu.selfcheck:configure_parser",
     "Check this machine's device: attention, optimizers, clipping, fp16 scaling and short training runs "
     "against float64 references; prints a table and writes JSON."),
    ("prepare-embedded", "diffusers_npu.train.cli:configure_prepare_parser",
     "Build the embedded offline digits models and data set (done automatically on first use)."),
]


def _load(target: str):
    module, _, func = target.partition(":")
    return getattr(import_module(module), func)


def build_parser(argv: Optional[Sequence[str]] = None) -> ArgumentParser:
    """The top-level parser. Only the sub-command named in ``argv`` (if any) gets its arguments."""
    parser = ArgumentParser(
        prog="diffusers-npu",
        description="Stable Diffusion fine-tuning and inference on Ascend NPU, NVIDIA GPU and CPU.",
        epilog="Run 'diffusers-npu COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-npu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=ArgumentParser)
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, target, help_text in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text, prog=f"diffusers-npu {name}")
        if name == chosen:
            _load(target)(command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``diffusers-npu``; returns the exit status (2 for usage/input errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        args = build_parser(argv).parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            raise UsageError(f"command {args.command!r} is not available")
        return func(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
