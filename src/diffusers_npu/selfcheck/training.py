"""The self-check's training runs: the ``tiny`` preset trained a few steps through the real trainer
(``diffusers_npu.train.run("text_to_image", argv)``) in every precision x optimizer x attention combination
the launchers use, with the trainer's own defaults for everything else on that device -- the runs that
would have caught channels_last stopping the default NPU run at set-up.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from typing import Dict, Iterator, List, Optional, Tuple

from .result import Result

# (row label, flags): the launchers' settings. "defaults" passes none, so the trainer decides precision,
# optimizer and attention for the device (test/train_full_1p_*.sh); the rest are test/text_to_image_8p.sh's.
LAUNCHER_CONFIGS: List[Tuple[str, Dict[str, object]]] = [
    ("defaults", {}),
    ("fp32 upcast", {"mixed_precision": "no", "attention": "upcast"}),
    ("fp16 upcast", {"mixed_precision": "fp16", "attention": "upcast"}),
    ("fp16 flash+ckpt+ema", {"mixed_precision": "fp16", "enable_npu_flash_attention": True,
                             "gradient_checkpointing": True, "use_ema": True}),
]
OPTIMIZERS = (None, "adamw", "fused_adamw", "megatron_adamw")  # None: the trainer's default for the device
CAPTION = "a handwritten digit {}"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven")


def prepare_inputs(workdir: str, seed: int = 0) -> Tuple[str, str]:
    """A tiny pipeline folder and an 8-image imagefolder data set (32 px images, trained at 16 px to keep the
    runs short; captions from the tiny preset's whole-word vocabulary)."""
    import numpy as np
    from PIL import Image

    from .. import presets

    model = os.path.join(workdir, "tiny-sd")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        with _no_progress_bars():
            presets.save_pipeline_folder(presets.build_components("tiny", seed=seed,
                                                                  tokenizer_dir=os.path.join(workdir, "tok")), model)
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(data, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i, word in enumerate(DIGITS):
            name = f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(data, name))
            f.write(json.dumps({"file_name": name, "text": CAPTION.format(word)}) + "\n")
    return model, data


def argv_for(model: str, data: str, output_dir: str, device: str, flags: Dict[str, object],
             optimizer: Optional[str], steps: int) -> List[str]:
    """The exact command line of one run (also printed in the JSON, so it can be rerun by hand)."""
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", output_dir,
            "--device", device, "--resolution", "16", "--center_crop", "--random_flip",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--max_grad_norm", "1", "--seed", "0", "--report_to", "none",
            "--dataloader_num_workers", "0", "--disable_progress_bar"]
    for key, value in flags.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    if optimizer:
        argv += ["--optimizer", optimizer]
    return argv


@contextlib.contextmanager
def _no_progress_bars():
    """The libraries' bars ("Writing model shards", "Loading weights", "Generating train split") would cut
    through the self-check's output; each library's switch is restored afterwards."""
    import datasets
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    switches = [(dlog.is_progress_bar_enabled, dlog.disable_progress_bar, dlog.enable_progress_bar),
                (tlog.is_progress_bar_enabled, tlog.disable_progress_bar, tlog.enable_progress_bar),
                (datasets.is_progress_bar_enabled, datasets.disable_progress_bars, datasets.enable_progress_bars),
                (lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars, hub.enable_progress_bars)]
    was = [is_on() for is_on, _, _ in switches]
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for state, (_, off, on) in zip(was, switches):
            (on if state else off)()


@contextlib.contextmanager
def _quiet():
    """Keep the trainer's step lines and INFO logs out of the self-check's table (warnings and errors, on
    stderr, still show; a failed run's error becomes the row's note)."""
    loggers = [logging.getLogger(n) for n in ("diffusers_npu", "accelerate", "diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _weights_moved(model_dir: str, output_dir: str) -> Optional[str]:
    """None if the saved UNet is finite and differs from the initial one (read back as a loader would)."""
    from safetensors.torch import load_file

    name = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    before, after = load_file(os.path.join(model_dir, name)), load_file(os.path.join(output_dir, name))
    if set(before) != set(after):
        return "saved UNet has other tensors than the initial one"
    if not all(t.isfinite().all() for t in after.values()):
        return "saved UNet holds non-finite weights"
    if all(before[k].equal(after[k]) for k in before):
        return "saved UNet equals the initial one: nothing was trained"
    return None


def _one_run(argv: List[str], model_dir: str, output_dir: str, steps: int) -> Result:
    from .. import train

    with _quiet(), _no_progress_bars():
        summary = train.run("text_to_image", argv)
    config = summary.get("config", {})
    used = "/".join(str(config.get(k, "?")) for k in ("mixed_precision", "optimizer", "attention"))
    loss = summary.get("final_loss", float("nan"))
    problems = []
    if summary.get("steps") != steps:
        problems.append(f"ran {summary.get('steps')} of {steps} steps")
    if not (isinstance(loss, (int, float)) and math.isfinite(loss)):
        problems.append(f"final loss {loss}")
    if not os.path.isfile(os.path.join(output_dir, "model_index.json")):
        problems.append("no pipeline saved")
    else:
        moved = _weights_moved(model_dir, output_dir)
        if moved is not None:
            problems.append(moved)
    if config.get("channels_last") and config.get("device") == "npu":
        problems.append("channels_last on NPU")
    note = f"{used}, loss {loss:.3f}" if isinstance(loss, float) else used
    skipped = summary.get("overflow_steps_skipped")
    if skipped:
        note += f", {skipped} fp16 step(s) skipped"
    return Result("", "FAIL" if problems else "pass", note="; ".join(problems + [note]))


def training_checks(device: str, workdir: str, steps: int = 10, seed: int = 0) -> Iterator[Result]:
    """One Result per (launcher config, optimizer); each Result's ``argv`` is the run's command line, with
    ``<workdir>`` standing for ``workdir`` (rerun it with ``--workdir`` to keep the inputs)."""
    from .numerics import dtype_unsupported

    model, data = prepare_inputs(workdir, seed)
    for label, flags in LAUNCHER_CONFIGS:
        for optimizer in OPTIMIZERS:
            if optimizer is None and flags:
                continue  # the trainer's default optimizer is checked once, with all defaults
            name = f"train tiny {steps} steps: {label}, {optimizer or 'default optimizer'}"
            out = os.path.join(workdir, "runs", f"{label.replace(' ', '_')}-{optimizer or 'default'}")
            argv = argv_for(model, data, out, device, flags, optimizer, steps)
            precision = str(flags.get("mixed_precision", ""))
            why_not = dtype_unsupported(device, precision) if precision in ("fp16", "bf16") else None
            if why_not:
                result = Result(name, "skip", note=why_not)
            else:
                start = time.perf_counter()
                try:
                    result = _one_run(argv, model, out, steps)
                except Exception as exc:  # the trainer's one-line errors and crashes alike: a failed check
                    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    result = Result("", "FAIL", note=f"{type(exc).__name__}: {text}")
                result.check, result.seconds = name, time.perf_counter() - start
            result.argv = [arg.replace(workdir, "<workdir>") for arg in argv]  # the same on every machine
            yield result


__all__ = ["LAUNCHER_CONFIGS", "argv_for", "prepare_inputs", "training_checks"]
