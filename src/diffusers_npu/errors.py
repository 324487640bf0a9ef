"""One error hierarchy for the whole project.

Every error a user can act on derives from :class:`DiffusersNpuError`. Entry points (the example scripts,
``test_infer/*.py``, ``diffusers-npu ...``) print such an error as ONE line, ``error: <message>``, on stderr
with no traceback, and exit with :attr:`DiffusersNpuError.exit_code`: 2 for bad input (flags, config files,
data, model folders, checkpoints), 3 for a failure during training (non-finite loss, every fp16 step
overflowing, a checkpoint that would hold non-finite weights, a full disk) and for a damaged checkpoint
(:class:`CheckpointDamaged`). Anything else is a bug and keeps its
traceback.

Messages name the flag, file, column or row, say what was expected, and (where it helps) what to do.

This module imports nothing, so any layer (device, data, inference, training) may use it.
"""
from __future__ import annotations

EXIT_USAGE = 2
EXIT_TRAINING = 3
EXIT_LEARNING_CHECK = 4


class DiffusersNpuError(Exception):
    """Base of every user-facing error of diffusers-npu."""

    exit_code = EXIT_USAGE


class UsageError(DiffusersNpuError, ValueError):
    """A flag, or a key of a ``--config`` file, has a wrong value or is missing."""


# Historical name used by the training flags; the same class.
ConfigError = UsageError


class InputError(UsageError):
    """An input file or folder given on the command line is missing or unusable."""


class DataError(DiffusersNpuError, ValueError):
    """Bad training data: names the file, column or row and what was expected."""


class ModelError(DiffusersNpuError, ValueError):
    """A missing or broken model folder or component, named."""


class CheckpointError(DiffusersNpuError, RuntimeError):
    """A checkpoint cannot be written or resumed from (incomplete, another model, changed run)."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files differ from its manifest, or cannot be read (truncated, deleted, flipped bytes).
    Exit status 3: the run cannot continue from it (``latest`` falls back instead of raising this)."""

    exit_code = EXIT_TRAINING


class TrainingError(DiffusersNpuError, RuntimeError):
    """Training cannot continue (non-finite loss or weights, fp16 overflow on every step, ...)."""

    exit_code = EXIT_TRAINING


class LearningCheckFailed(DiffusersNpuError):
    """The trained embedded model did not reach --learning_check_min (the model is saved all the same)."""

    exit_code = EXIT_LEARNING_CHECK


def one_line(exc: BaseException) -> str:
    """The ``error: ...`` line an entry point prints for ``exc``."""
    text = str(exc).strip() or type(exc).__name__
    return f"error: {text}"


__all__ = [
    "EXIT_LEARNING_CHECK",
    "EXIT_TRAINING",
    "EXIT_USAGE",
    "CheckpointDamaged",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiffusersNpuError",
    "InputError",
    "LearningCheckFailed",
    "ModelError",
    "TrainingError",
    "UsageError",
    "one_line",
]
