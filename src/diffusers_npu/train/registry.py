"""The one table of training tasks: the CLI (``diffusers-npu train|launch TASK``), the example scripts and the
launchers all look tasks up here.

A task registers itself with :func:`register_task` in its own module under ``diffusers_npu/train/tasks/``;
every module of that package is imported the first time a task is looked up, so adding a task is one new
file there plus its example script, nothing else::

    @register_task
    class MyTask(DiffusionTask):
        name = "my_task"
        description = "One sentence for --help and 'diffusers-npu train --help'."
        example = "examples/my_task/train_my_task.py"
        launch = LaunchProfile(network="StableDiffusion_my_task", embedded={...}, pretrained={...})

Names are spelled with underscores; ``text-to-image`` and ``text_to_image`` both find the same task.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import UsageError


@dataclass(frozen=True)
class LaunchProfile:
    """How the ModelZoo-style launcher runs a task when the user gives only ``--key=value`` overrides.

    ``embedded``: training flags (name -> value; ``True`` for a switch) for the offline embedded default (no
    ``--model_name``); ``pretrained``: the flags used with a real model (upstream's hyper-parameters).
    ``distributed``: default ``--distributed`` mode for multi-device runs (``ddp``; full SDXL fine-tuning
    shards). ``learning_check``: whether the embedded run ends with the learning check. ``expected``: the
    embedded default's measured time, for the start-of-run plan line.
    """

    network: str
    embedded: Dict[str, object] = field(default_factory=dict)
    pretrained: Dict[str, object] = field(default_factory=dict)
    distributed: str = "ddp"
    learning_check: bool = False
    # The measured time of the embedded default on an idle 2-core CPU (the plan line shows it when a run
    # trains exactly the embedded default's steps and batch on one CPU process); "" when not measured.
    expected: str = ""


_REGISTRY: Dict[str, type] = {}
_DISCOVERED = False


def canonical(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register_task(cls):
    """Class decorator: make ``cls`` findable by ``cls.name``."""
    key = canonical(cls.name)
    other = _REGISTRY.get(key)
    if other is not None and other is not cls and (other.__module__, other.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise ValueError(f"two training tasks are named {key!r}: {other.__module__} and {cls.__module__}")
    _REGISTRY[key] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    from . import tasks as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _DISCOVERED = True


def task_names() -> List[str]:
    _discover()
    return sorted(_REGISTRY)


def get_task(name: str):
    """The task class registered as ``name`` (either spelling); a :class:`UsageError` naming the known tasks
    (and the nearest one) otherwise."""
    _discover()
    key = canonical(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    near = difflib.get_close_matches(key, list(_REGISTRY), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise UsageError(f"unknown training task {name!r}{hint}; known tasks: {', '.join(sorted(_REGISTRY))}")


def find_task(name: str) -> Optional[type]:
    try:
        return get_task(name)
    except UsageError:
        return None


__all__ = ["LaunchProfile", "canonical", "find_task", "get_task", "register_task", "task_names"]
