"""Training entry point shared by every example script.

``main(TaskClass, argv)`` parses the common flags plus the task's own, fills in defaults (the embedded
offline model and data set when none is given), runs the :class:`~diffusers_npu.train.loop.Trainer`, and
turns known failures into one clear ``error:`` line and a non-zero exit code.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("diffusers_npu.train")

# Exit codes: 0 ok (or pre-empted after saving), 2 bad input/flags, 3 training failure (non-finite loss...).
EXIT_USAGE, EXIT_TRAINING = 2, 3


def build_parser(task_cls, description=None):
    from .args import common_parser

    p = common_parser(description or (task_cls.__doc__ or task_cls.name).strip().splitlines()[0])
    task_cls.add_arguments(p)
    return p


def finalize_args(args, task_cls=None):
    """Resolve defaults that depend on other flags or on the device. Mutates and returns ``args``."""
    from .args import ConfigError

    if args.seed is None:
        args.seed = 0
    embedded = args.pretrained_model_name_or_path in (None, "", "embedded")
    has_data = any(getattr(args, k, None) for k in ("dataset_name", "local_data_dir", "train_data_dir",
                                                    "instance_data_dir"))
    if embedded or (not has_data and getattr(task_cls, "uses_embedded_data", True)):
        from .. import embedded as emb

        paths = emb.prepare(progress=not args.disable_progress_bar)
        if embedded:
            args.pretrained_model_name_or_path = paths["model"]
        if not has_data:
            args.dataset_name = paths["dataset"]
        if args.resolution is None:
            args.resolution = emb.RESOLUTION
        if args.learning_check is None:
            args.learning_check = embedded and (task_cls is None or task_cls.name == "text_to_image")
    args.embedded = embedded
    if args.resolution is None:
        args.resolution = 512
    if args.learning_check is None:
        args.learning_check = False
    if args.resolution % 8:
        raise ConfigError(f"--resolution must be divisible by 8 (got {args.resolution})")
    for flag in ("train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ConfigError(f"--max_train_steps must be >= 1 (got {args.max_train_steps})")
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        raise ConfigError(f"--checkpointing_steps must be >= 1 (got {args.checkpointing_steps})")

    from ..device import detect_device, supports_bf16

    device = detect_device(args.device)
    # Original port flags map onto the general ones.
    flags = [n for n, v in (("--use_megatron_npu_adamW", args.use_megatron_npu_adamW),
                            ("--use_npu_fuse_adamW", args.use_npu_fuse_adamW),
                            ("--use_8bit_adam", args.use_8bit_adam)) if v]
    if len(flags) > 1:
        raise ConfigError(f"choose one optimizer flag, got {', '.join(flags)}")
    if args.optimizer is None:
        from ..optim import optimizer_name_from_flags

        if flags:
            args.optimizer = optimizer_name_from_flags(args.use_megatron_npu_adamW, args.use_npu_fuse_adamW,
                                                       args.use_8bit_adam)
        else:
            args.optimizer = "fused_adamw" if device in ("cuda", "npu") else "adamw"
    if args.use_clip_grad_norm_fused:
        if args.optimizer != "fused_adamw":
            raise ConfigError("--use_clip_grad_norm_fused needs the fused optimizer (--use_npu_fuse_adamW)")
        if not args.max_grad_norm:
            args.max_grad_norm = 1.0
    if args.enable_npu_flash_attention:
        if args.attention not in (None, "flash"):
            raise ConfigError(f"--enable_npu_flash_attention conflicts with --attention {args.attention}")
        args.attention = "flash"
    args.attention = args.attention or "auto"
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device in ("cuda", "npu") and supports_bf16(device) else "no"
    if args.mixed_precision == "bf16" and device != "cpu" and not supports_bf16(device):
        raise ConfigError(f"--mixed_precision bf16 is not supported on this {device} device; use fp16")
    if args.channels_last is None:
        args.channels_last = device in ("cuda", "npu")
    if args.log_every is None:
        args.log_every = 1 if device == "cpu" else 10
    args.device = device
    return args


def run(task_cls, argv=None):
    """Parse, train, and return the summary dict (raises on errors; see :func:`main`)."""
    from .args import parse_with_config
    from .loop import Trainer

    parser = build_parser(task_cls)
    args = parse_with_config(parser, argv)
    finalize_args(args, task_cls)
    task = task_cls(args)
    task.validate_args()
    existed = os.path.exists(args.output_dir)
    try:
        return Trainer(args, task).run()
    except BaseException:
        # Bad input found before anything worth keeping was written: leave no half-made output folder behind.
        if not existed and _holds_nothing_of_value(args.output_dir):
            import shutil

            shutil.rmtree(args.output_dir, ignore_errors=True)
        raise


def _holds_nothing_of_value(folder: str) -> bool:
    if not os.path.isdir(folder):
        return False
    names = set(os.listdir(folder))
    return not any(n.startswith("checkpoint-") or n == "model_index.json" for n in names)


def main(task_cls, argv=None) -> int:
    from ..checkpoint import CheckpointError
    from ..data.sources import DataError
    from .args import ConfigError
    from .loop import TrainingError
    from .task import ModelError

    logging.basicConfig(level=os.environ.get("DIFFUSERS_NPU_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        summary = run(task_cls, argv)
    except (ConfigError, DataError, ModelError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_TRAINING
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            print(f"error: disk full while writing {getattr(e, 'filename', '') or 'output'}: {e.strerror}; "
                  f"the last complete checkpoint is intact", file=sys.stderr, flush=True)
            return EXIT_TRAINING
        raise
    if summary.get("exit_reason") == "preempted":
        print("Pre-empted: checkpoint saved; rerun the same command with --resume_from_checkpoint latest "
              "to continue.", flush=True)
    return 0
