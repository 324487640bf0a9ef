"""The training command of each Trainer mode: which task and flags a mode runs, the command line the harness
builds for it (its own settings only where the user's flags and ``--config`` leave them open), and the
equivalent command a user would type."""
from __future__ import annotations

import shlex

from ..errors import UsageError

TRAINER_MODES = {"online": ("full", []), "cached": ("full", ["--cache_latents"]),
                 "compiled": ("full", ["--cache_latents", "--compile"]), "lora": ("lora", ["--use_lora"]),
                 "controlnet": ("controlnet", [])}
TASKS = {(False, "full"): "text_to_image", (False, "lora"): "text_to_image", (False, "controlnet"): "controlnet",
         (True, "full"): "text_to_image_sdxl", (True, "lora"): "text_to_image_sdxl",
         (True, "controlnet"): "controlnet_sdxl"}


def mode_spec(a, name: str) -> dict:
    """What a Trainer mode runs: task, kind of step, and the mode's own flags (SD3 / FLUX presets:
    :func:`.dit.mode_spec`)."""
    if getattr(a, "dit", None):
        from .dit import mode_spec as dit_mode_spec

        return dit_mode_spec(a, name)
    if name.startswith("flags"):
        i = 0 if name == "flags" else int(name[5:]) - 1
        flags = shlex.split(a.flags[i])
        kind = "lora" if "--use_lora" in flags else "full"
        return {"task": a.task or TASKS[(a.sdxl, kind)], "kind": kind, "flags": flags}
    kind, flags = TRAINER_MODES[name]
    task = a.task if a.task and kind != "controlnet" else TASKS[(a.sdxl, kind)]
    return {"task": task, "kind": kind, "flags": list(flags)}


def _dests_set(task_cls, tokens: list) -> set:
    """Flags (as dests) that ``tokens`` set, directly or through a ``--config`` file: the harness leaves those
    to the user."""
    from ..train.config import build_parser as task_parser, load_config_file

    parser = task_parser(task_cls)
    dests = set()
    for i, tok in enumerate(tokens):
        action = parser._option_string_actions.get(tok.split("=", 1)[0])
        if action is not None:
            dests.add(action.dest)
            if action.dest == "config":
                path = tok.split("=", 1)[1] if "=" in tok else tokens[i + 1]
                dests |= {str(k).lstrip("-").replace("-", "_") for k in load_config_file(path)}
    return dests


def trainer_argv(a, fx: dict, spec: dict, task_cls, output_dir: str, engine) -> list:
    """The training script's command line of a mode (harness settings the user's flags did not set)."""
    mode_flags = spec["flags"] + shlex.split(a.extra_flags)
    user = _dests_set(task_cls, mode_flags)
    data_flag = "--instance_data_dir" if getattr(a, "dit", None) else "--train_data_dir"  # DreamBooth: the images
    argv = [] if a.embedded else ["--pretrained_model_name_or_path", fx["model"], data_flag, fx["data"]]
    defaults = [("resolution", ["--resolution", str(a.resolution)]),
                ("train_batch_size", ["--train_batch_size", str(a.batch_size)]),
                ("center_crop", ["--center_crop"]), ("random_flip", ["--random_flip"]),
                ("dataloader_num_workers", ["--dataloader_num_workers", str(a.workers)])]
    if a.workers:
        defaults += [("enable_persistent_workers", ["--enable_persistent_workers"])]
        if a.device != "cpu":
            defaults += [("enable_pin_memory", ["--enable_pin_memory"])]
    if a.mixed_precision:
        defaults += [("mixed_precision", ["--mixed_precision", a.mixed_precision])]
    if "--cache_latents" in mode_flags or "cache_latents" in user:
        # The harness's own cache folder: the user's $DIFFUSERS_NPU_HOME cache is not filled with benchmark data.
        defaults += [("cache_dir", ["--cache_dir", fx["cache"]])]
    for dest, flags in defaults:
        if dest not in user and not (a.embedded and dest in ("resolution", "center_crop", "random_flip")):
            argv += flags
    argv += ["--seed", str(a.seed), "--device", a.device, "--max_train_steps", str(a.warmup + a.steps),
             "--output_dir", output_dir, "--report_to", "none", "--disable_progress_bar"]
    if engine:
        argv += ["--distributed", engine]
    return argv + mode_flags


def equivalent_command(a, task: str, argv: list, nproc: int) -> str:
    from ..train import task_class

    script = task_class(task).example or f"python -m diffusers_npu.train {task}"
    env = []
    if a.device == "cpu" and a.threads:
        env.append(f"OMP_NUM_THREADS={a.threads}")
    if nproc > 1:
        env += ["ACCELERATE_USE_CPU=true"] if a.device == "cpu" else []
        return " ".join(env + ["torchrun", "--nproc_per_node", str(nproc), script, shlex.join(argv)])
    return " ".join(env + ["python", script, shlex.join(argv)])


def parsed_args(task_cls, argv):
    from ..train.config import parse_args

    return parse_args(task_cls, argv)


def check_flags(a, name: str, spec: dict) -> None:
    """Parse a mode's command line before anything runs: a bad --flags / --extra_flags stops the harness at
    once with the training parser's one-line message, not after the other modes."""
    from ..train import task_class

    task_cls = task_class(spec["task"])
    fake = {"model": "MODEL", "data": "DATA", "cache": "CACHE"}
    try:
        parsed_args(task_cls, trainer_argv(a, fake, spec, task_cls, "OUT", a.engines[0]))
    except UsageError as e:
        given = " ".join(spec["flags"] + shlex.split(a.extra_flags))
        raise UsageError(f"mode {name} ({spec['task']}, flags {given!r}): {e}") from None
