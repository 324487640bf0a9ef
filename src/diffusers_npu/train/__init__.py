"""Training entry point shared by every example script, ``diffusers-npu train`` and ``python -m
diffusers_npu.train``.

``main(task, argv)`` parses the task's flags (defaults <- ``--config`` <- command line), prepares the embedded
offline model and data set when the run uses them (one writer first, the others wait), resolves the
device-dependent defaults (:func:`~diffusers_npu.train.config.resolve_defaults`), runs the
:class:`~diffusers_npu.train.loop.Trainer`, and turns known failures into one ``error:`` line and an exit code:
0 done (or pre-empted after saving), 2 bad input, 3 training failure, 4 learning check below threshold,
128+N interrupted by signal N during start-up or by a second signal.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("diffusers_npu.train")


def task_class(task):
    """A task class from a class or a registered name (either spelling)."""
    if isinstance(task, type):
        return task
    from .registry import get_task

    return get_task(task)


def prepare_args(task_cls, argv=None, prog=None):
    """Parse and resolve the flags of one run (embedded default made first when needed)."""
    from ..device import detect_device
    from ..errors import UsageError
    from .config import device_info, needs_embedded, parse_args, resolve_defaults
    from .engine import world_size_from_env

    args = parse_args(task_cls, argv, prog=prog or _prog(task_cls, argv))
    args.task_name = task_cls.name
    if args.local_rank is not None and args.local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)  # what upstream does with the flag
    try:
        kind = detect_device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device: {e}") from None
    world = world_size_from_env()
    if world > 1:
        import atexit

        atexit.register(_destroy_process_group)
    paths = None
    if needs_embedded(args, task_cls):
        from .ranks import process_state, writers_first

        # One writer builds the embedded model and data set (the global main process; then each other node's
        # main process, which finds it already there when the home folder is shared); the others wait and read.
        state = process_state(kind, args.nccl_timeout)
        with writers_first(state.is_main_process, state.is_local_main_process, state.wait_for_everyone):
            paths = task_cls.prepare_embedded(progress=state.is_local_main_process and sys.stdout.isatty())
    args = resolve_defaults(args, device_info(kind, world), paths, task_cls)
    check_model_family(args, task_cls)
    return args


def check_model_family(args, task_cls) -> None:
    """A pipeline folder of another family (an SDXL folder given to an SD script, SD3/FLUX to either) is refused
    before anything loads, naming the script to use."""
    from ..model_folder import check_family, looks_local

    path = args.pretrained_model_name_or_path
    family = getattr(task_cls.family, "name", task_cls.family)
    if family and path and looks_local(path):
        script = os.path.basename(task_cls.example) if task_cls.example else f"the {task_cls.name} task"
        check_family(path, "--pretrained_model_name_or_path", family, script)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _prog(task_cls, argv) -> str:
    """A script run from the shell (argv None) names itself in messages; otherwise the CLI form."""
    script = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else ""
    return script if script.endswith(".py") and script != "__main__.py" else f"diffusers-npu train {task_cls.name}"


def run(task, argv=None) -> dict:
    """Parse, train, and return the summary dict (raises on errors; see :func:`main`)."""
    import time

    from .loop import Trainer
    from .preemption import Preemption

    started = time.time()  # the summary's e2e time counts parsing and preparation too
    task_cls = task_class(task)
    startup = Preemption().install()  # signals during parsing and embedded preparation: stop with a message
    try:
        args = prepare_args(task_cls, argv)
    finally:
        startup.restore()
    try:
        return Trainer(args, task_cls, started=started).run()
    except Exception as exc:
        from ..errors import TrainingError
        from .ranks import is_peer_failure, peer_lost_message

        if is_peer_failure(exc):  # one line instead of the backend's traceback
            raise TrainingError(peer_lost_message(args.output_dir, exc)) from None
        raise


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of the record (not the one at set-up), so a caller
    that swaps stdout (a notebook, a test's capture) never leaves the handler on a closed stream."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging() -> None:
    """INFO lines on stdout; the libraries' own progress bars only on a terminal (a log file gets our step
    lines, not dozens of 'Writing model shards' bars)."""
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStdout) for h in root.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(os.environ.get("DIFFUSERS_NPU_LOG_LEVEL", "INFO"))
    for noisy in ("httpx", "urllib3", "filelock", "fsspec", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not sys.stdout.isatty():
        import datasets
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def main(task, argv=None) -> int:
    from ..errors import DiffusersNpuError, one_line
    from .preemption import Interrupted

    from .ranks import record_exit

    configure_logging()
    try:
        summary = run(task, argv)
    except DiffusersNpuError as e:
        record_exit(e.exit_code, one_line(e))  # first: torchrun may stop this process once it has failed
        print(one_line(e), file=sys.stderr, flush=True)
        return e.exit_code
    except Interrupted as e:
        note = getattr(e, "note", None) or "nothing was trained yet"
        record_exit(e.exit_code, f"error: stopped by {e}")
        print(f"error: stopped by {e}; {note}", file=sys.stderr, flush=True)
        return e.exit_code
    except SystemExit as e:  # --help, argparse
        record_exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise
    except BaseException as e:  # a bug: Python prints the traceback and exits 1
        record_exit(1, f"error: {type(e).__name__}: {e}"[:300])
        raise
    record_exit(0)
    if summary.get("exit_reason") == "preempted" and os.environ.get("RANK", "0") == "0":
        print("Pre-empted: checkpoint saved; rerun the same command (with --resume_from_checkpoint latest) to "
              "continue.", flush=True)
    return 0


__all__ = ["main", "prepare_args", "run", "task_class"]
