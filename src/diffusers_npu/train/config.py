"""Training configuration: defaults <- ``--config`` file <- command line, validated once.

:func:`parse_args` reads the flags of a task. A ``--config`` file (YAML or JSON, keys are flag names) is
checked with the same argparse types and choices as the command line, key by key: an unknown key (with a
"did you mean"), a bad choice, a wrong type (``use_ema: "false"`` is a string, not a boolean), or a file that
is not YAML/JSON is one :class:`~diffusers_npu.errors.UsageError` naming the key and the file.

:func:`resolve_defaults` is the ONE place where defaults that depend on the device, on other flags or on the
embedded model are decided. It is a pure function of the parsed flags and a :class:`DeviceInfo`, so tests
can check what a run on an NPU would use without an NPU.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError
from .args import common_parser

_TRUE_STRINGS = {"true", "yes", "on", "1"}
_FALSE_STRINGS = {"false", "no", "off", "0"}


# ------------------------------------------------------------------------------------------- parsing
def build_parser(task_cls, prog: Optional[str] = None):
    prog = prog or f"diffusers-npu train {task_cls.name}"
    parser = common_parser(prog, task_cls.description)
    parser.epilog = no_arguments_help(task_cls)
    task_cls.add_arguments(parser)
    if task_cls.defaults:
        unknown = set(task_cls.defaults) - {a.dest for a in parser._actions}
        if unknown:  # a programming error in the task, not a user error
            raise ValueError(f"{task_cls.__name__}.defaults names unknown flags: {sorted(unknown)}")
        parser.set_defaults(**task_cls.defaults)
    return parser


def no_arguments_help(task_cls) -> Optional[str]:
    """The --help sentence saying what a run with no arguments does (the launcher's embedded default)."""
    profile = getattr(task_cls, "launch", None)
    if profile is None:
        return None
    if not profile.embedded:  # the FLUX.1 tasks: no embedded model
        return ("With no arguments: there is no embedded model for this task; give --pretrained_model_name_or_path "
                "and the data flags.")
    flags = " ".join(f"--{k}={v}" if v is not True else f"--{k}" for k, v in profile.embedded.items())
    check = ", then the learning check (exit 4 below --learning_check_min)" if profile.learning_check else ""
    expected = f"; {profile.expected}" if profile.expected else ""
    return (f"With no arguments: trains the embedded offline digits model on the embedded digits data set with the "
            f"flags the launcher uses ({flags}){check}{expected}. Any argument turns this off: then the defaults "
            f"above apply.")


def parse_args(task_cls, argv=None, prog: Optional[str] = None) -> argparse.Namespace:
    import sys

    parser = build_parser(task_cls, prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    config_file = known.config
    if not argv:
        # No arguments at all: the embedded default exactly as the launcher runs it (its tuned flags and
        # config file), not the upstream defaults that fit a real model (hours on a CPU, no learning check).
        profile_values, config_file = embedded_profile_values(parser, task_cls)
        parser.set_defaults(**profile_values)
    elif config_file:
        parser.set_defaults(**config_values(parser, config_file))
    args = parser.parse_args(argv)
    args.config_file = config_file
    args.no_arguments = not argv
    return args


def embedded_profile_values(parser, task_cls):
    """(flag values, config file) of the task's launch profile for the embedded default: what a run with no
    arguments uses, the same flags the launcher passes (its config file read like ``--config``)."""
    profile = getattr(task_cls, "launch", None)
    if profile is None:
        return {}, None
    values, config_file = {}, None
    for name, value in profile.embedded.items():
        if name == "config":
            from ..launch.plan import REPO_ROOT

            config_file = value if os.path.isabs(value) else os.path.join(REPO_ROOT, value)
            values.update(config_values(parser, config_file))
        else:
            values[name] = value
    if profile.learning_check:
        values["learning_check"] = True
    return values, config_file


def load_config_file(path) -> dict:
    path = str(path)
    if not os.path.isfile(path):
        raise UsageError(f"--config: {path} does not exist")
    kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if kind == "YAML":
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except UnicodeDecodeError as e:
        raise UsageError(f"--config: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: name the place
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else (
            f" at line {e.lineno}" if hasattr(e, "lineno") else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--config: {path} is not valid {kind}{at}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a mapping of flag names to values, not a "
                         f"{type(data).__name__}")
    return data


def config_values(parser, path) -> dict:
    """Validated, typed values of a config file, as argparse would have produced them from the command
    line. Raises a one-line UsageError naming the file and the key."""
    path = str(path)
    raw = load_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    values = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            near = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UsageError(f"--config {path}: unknown key '{key}'{hint}")
        values[dest] = _typed_value(parser, action, value, f"--config {path}: key '{key}'")
    return values


def _typed_value(parser, action, value, where: str):
    flag = action.option_strings[-1] if not action.option_strings[0].startswith("--no-") else \
        action.option_strings[0]
    flag = next((o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")), flag)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if isinstance(value, bool):
            return value if not isinstance(action, argparse._StoreFalseAction) else not value
        hint = ""
        if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
            hint = f" (write {value.strip().lower() in _TRUE_STRINGS and 'true' or 'false'} without quotes)"
        raise UsageError(f"{where}: expected true or false, got {type(value).__name__} {value!r}{hint}")
    if value is None:
        return None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        tokens = [_token(v, where) for v in items]
    else:
        if isinstance(value, (list, dict)):
            raise UsageError(f"{where}: expected a single value, got a {type(value).__name__}")
        tokens = [_token(value, where)]
    # Parse through a one-flag copy of the parser: the same type conversion and choices as the command line.
    probe = copy.copy(parser)
    captured = []

    def error(message):
        captured.append(message)
        raise _ProbeError(message)

    probe.error = error
    try:
        ns = probe.parse_args([flag, *tokens] if tokens else [flag])
    except _ProbeError:
        msg = captured[-1].replace(f"argument {'/'.join(action.option_strings)}: ", "")
        raise UsageError(f"{where}: {msg}") from None
    return getattr(ns, action.dest)


class _ProbeError(Exception):
    pass


def _token(value, where: str) -> str:
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a value, got the boolean {str(value).lower()}")
    if isinstance(value, (dict, list)):
        raise UsageError(f"{where}: expected a value, got a {type(value).__name__}")
    return str(value)


# ------------------------------------------------------------------------------------- defaults
@dataclass(frozen=True)
class DeviceInfo:
    """What :func:`resolve_defaults` needs to know about the machine (built by :func:`device_info`)."""

    kind: str                       # "npu" | "cuda" | "cpu"
    supports_bf16: bool = True
    fusion_attention: bool = False  # NPU: this SoC has npu_fusion_attention
    world_size: int = 1


def device_info(kind: str, world_size: int = 1) -> DeviceInfo:
    from .. import device as dev

    fused = kind == "npu" and dev.npu_supports_fusion_attention()
    return DeviceInfo(kind=kind, supports_bf16=dev.supports_bf16(kind), fusion_attention=fused,
                      world_size=world_size)


def resolve_defaults(args: argparse.Namespace, info: DeviceInfo, embedded: Optional[dict] = None,
                     task_cls=None) -> argparse.Namespace:
    """Return a copy of ``args`` with every device- and flag-dependent default decided.

    ``embedded``: the embedded default's paths ({'model': ..., 'dataset': ...}) when the run uses it (made
    beforehand by :func:`diffusers_npu.embedded.prepare`), else None. Raises UsageError for contradictory flags.
    """
    a = copy.copy(args)
    device = info.kind
    a.device = device
    a.embedded = a.pretrained_model_name_or_path in (None, "", "embedded")
    if embedded is not None:
        if a.embedded:
            a.pretrained_model_name_or_path = embedded["model"]
        if not _has_data(a) and embedded.get("dataset"):
            a.dataset_name = embedded["dataset"]
        if a.resolution is None:
            a.resolution = embedded.get("resolution", 16)
    if a.pretrained_model_name_or_path in (None, "", "embedded"):
        raise UsageError("--pretrained_model_name_or_path is needed (the embedded model was not prepared)")
    if a.resolution is None:
        a.resolution = task_cls.default_resolution if task_cls is not None else 512
    if a.learning_check is None:
        a.learning_check = False
    if a.learning_check and not a.embedded:
        raise UsageError("--learning_check needs the embedded digits model (it asks for digits by name); "
                         "drop --pretrained_model_name_or_path or --learning_check")

    # Original-port and upstream flags map onto the general ones.
    flags = [n for n, v in (("--use_megatron_npu_adamW", a.use_megatron_npu_adamW),
                            ("--use_npu_fuse_adamW", a.use_npu_fuse_adamW),
                            ("--use_8bit_adam", a.use_8bit_adam)) if v]
    if len(flags) > 1:
        raise UsageError(f"choose one optimizer flag, got {', '.join(flags)}")
    if flags and a.optimizer is not None:
        raise UsageError(f"{flags[0]} conflicts with --optimizer {a.optimizer}")
    if a.optimizer is None:
        a.optimizer = {"--use_megatron_npu_adamW": "megatron_adamw", "--use_npu_fuse_adamW": "fused_adamw",
                       "--use_8bit_adam": "adamw_8bit"}.get(flags[0] if flags else "", None)
    if a.optimizer is None:
        # Fused AdamW on accelerators; on CPU the foreach kernel is faster for small models.
        a.optimizer = "fused_adamw" if device in ("cuda", "npu") else "adamw"
    if a.use_clip_grad_norm_fused:
        if a.optimizer != "fused_adamw":
            raise UsageError("--use_clip_grad_norm_fused needs the fused optimizer (--use_npu_fuse_adamW)")
        if not a.max_grad_norm:
            a.max_grad_norm = 1.0
    wants_flash = [f for f, v in (("--enable_npu_flash_attention", a.enable_npu_flash_attention),
                                  ("--enable_xformers_memory_efficient_attention",
                                   a.enable_xformers_memory_efficient_attention)) if v]
    if wants_flash:
        if a.attention not in (None, "flash"):
            raise UsageError(f"{wants_flash[0]} conflicts with --attention {a.attention}")
        a.attention = "flash"
    a.attention = a.attention or "auto"
    if a.mixed_precision is None:
        a.mixed_precision = "bf16" if device in ("cuda", "npu") and info.supports_bf16 else "no"
    if a.mixed_precision == "bf16" and device != "cpu" and not info.supports_bf16:
        raise UsageError(f"--mixed_precision bf16 is not supported on this {device} device; use fp16")
    if a.channels_last is None:
        # NPU: torch_npu's _to_copy accepts only contiguous/preserve formats and NpuFusedAdamW refuses
        # non-contiguous parameters, so channels_last would stop the run at set-up.
        a.channels_last = device == "cuda"
    elif a.channels_last and device == "npu":
        raise UsageError("--channels_last is not supported on NPU (torch_npu refuses the memory format)")
    if a.log_every is None:
        a.log_every = 1 if device == "cpu" else 10
    if a.validation_prompt:
        a.validation_prompts = list(a.validation_prompts or []) + list(a.validation_prompt)
    if a.num_validation_images == 0:
        a.validation_prompts = None  # as upstream: no validation images (its example tests pass 0)
    if a.validation_steps and a.validation_epochs:
        a.validation_epochs = None  # as upstream's textual inversion: steps win
    a.distributed = a.distributed if info.world_size > 1 else "none"
    if a.cache_latents and task_cls is not None and not task_cls.supports_cache:
        raise UsageError(f"--cache_latents is not available for {task_cls.name} (its samples carry more than "
                         f"an image and a caption)")
    if a.aspect_ratio_buckets and task_cls is not None and not task_cls.supports_buckets:
        raise UsageError(f"--aspect_ratio_buckets is not available for {task_cls.name}")
    if a.use_ema and task_cls is not None and not task_cls.supports_ema:
        raise UsageError(f"--use_ema is not available for {task_cls.name} ({task_cls.ema_refusal})")
    if a.offload_ema and not a.use_ema:
        raise UsageError("--offload_ema needs --use_ema")
    if task_cls is not None:
        task_cls.resolve_args(a)
    return a


def expected_time(a, task_cls) -> Optional[str]:
    """The task's measured time when this run is its embedded default (same steps, batch and accumulation, one
    CPU process); None otherwise (nothing measured says how long another run takes)."""
    profile = getattr(task_cls, "launch", None)
    if profile is None or not profile.expected or not a.embedded or a.device != "cpu" or a.distributed != "none":
        return None
    want = dict(profile.embedded)
    if "config" in want:
        from ..launch.plan import REPO_ROOT

        path = want.pop("config")
        path = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
        want = {**(load_config_file(path) if os.path.isfile(path) else {}), **want}
    same = all(getattr(a, k) == want.get(k, getattr(a, k)) for k in
               ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"))
    return profile.expected if same else None


def _has_data(a) -> bool:
    return any(getattr(a, k, None) for k in ("dataset_name", "local_data_dir", "train_data_dir",
                                             "instance_data_dir"))


def needs_embedded(args, task_cls) -> bool:
    """Whether the run uses the embedded model or the embedded data set (so it must be prepared first)."""
    model = args.pretrained_model_name_or_path in (None, "", "embedded")
    return model or (not _has_data(args) and task_cls.uses_embedded_data)


__all__ = ["DeviceInfo", "build_parser", "config_values", "device_info", "embedded_profile_values", "expected_time",
           "load_config_file", "needs_embedded", "parse_args", "resolve_defaults"]
