"""Evaluation of a training run: validation image grids, the learning check and the run summary.

* :func:`validate` -- ``validation/<tag>.png``: ``--num_validation_images`` images per validation prompt, from
  seed ``--seed`` (same noise every time, so grids of successive steps compare), also sent to tensorboard.
* :func:`run_learning_check` -- the embedded digits model's verdict: 10 images per digit, read by a digits
  classifier, at the pipeline's default guidance and at guidance 1; ``learning_check.png`` (both grids side by
  side; rows = prompt digit, green frame = read as asked, red = not); per-digit figures; passed when the
  agreement at the default guidance reaches ``--learning_check_min``.
* :func:`write_summary` -- ``train_summary.json`` (the launcher reads it) and ``train_curves.png``. A resumed
  run keeps the earlier parts: ``e2e_seconds`` is this part, ``e2e_seconds_total`` all of them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import List, Optional

import numpy as np
import torch

from ..fsutil import write_json_atomic
from ..metrics import plot_history

logger = logging.getLogger(__name__)

SUMMARY_NAME = "train_summary.json"


def validate(trainer, tag: str) -> Optional[str]:
    """One grid of validation images. Every rank joins when the model is sharded (its forward is a
    collective); otherwise only the main process works."""
    t = trainer
    a, rt = t.args, t.rt
    if not a.validation_prompts or (not rt.is_main and not rt.sharded):
        return None
    from diffusers.utils import make_image_grid

    pipe = t.task.pipeline()
    trained = [m for m in t.model_parts() if m.training]
    for m in trained:
        m.eval()
    images = []
    g = torch.Generator("cpu").manual_seed(a.seed)
    try:
        with torch.no_grad(), t.precision.autocast():
            for i, prompt in enumerate(a.validation_prompts):
                out = pipe(prompt, num_images_per_prompt=a.num_validation_images, generator=g,
                           height=a.resolution, width=a.resolution, num_inference_steps=a.validation_inference_steps,
                           callback_on_step_end=t.preemption.check, **t.task.validation_kwargs(i, prompt))
                images.extend(out.images)
    finally:
        for m in trained:
            m.train()
        t.task.after_validation()
    if not rt.is_main:
        return None
    grid = make_image_grid(images, rows=len(a.validation_prompts), cols=a.num_validation_images)
    folder = os.path.join(a.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{tag}.png")
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    rt.finished(path)
    for tracker in t.accelerator.trackers:
        if tracker.name == "tensorboard":
            arr = np.stack([np.asarray(im) for im in images])
            tracker.writer.add_images("validation", arr, t.state.global_step, dataformats="NHWC")
    logger.info("validation images: %s", path)
    return path


def learning_check_grid(images: List[np.ndarray], preds, targets, per_digit: int):
    """Rows = prompt digit (0..9), columns = samples; each cell framed green (read as asked) or red."""
    from PIL import Image, ImageDraw

    cell = 40
    pad = 3
    label_w = 22
    grid = Image.new("RGB", (label_w + per_digit * cell, 10 * cell), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, p, tgt) in enumerate(zip(images, preds, targets)):
        row, col = int(tgt), k % per_digit
        arr = (np.clip(np.asarray(img, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
        tile = Image.fromarray(arr).convert("RGB").resize((cell - 2 * pad, cell - 2 * pad), Image.NEAREST)
        x, y = label_w + col * cell, row * cell
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(40, 170, 60) if int(p) == int(tgt) else (210, 40, 40))
        grid.paste(tile, (x + pad, y + pad))
        if col == 0:
            draw.text((5, y + cell // 2 - 6), str(row), fill="black")
    return grid


def run_learning_check(trainer) -> dict:
    """The embedded model's verdict, on the saved output (main process): at the pipeline's default guidance
    (the figure that passes or fails) and at guidance 1, i.e. the conditional model alone (no unconditional
    pass, so half the cost), which shows whether the model learned the digits or leans on guidance."""
    from diffusers import DiffusionPipeline

    from ..embedded import learning_check

    t = trainer
    a = t.args
    pipe = DiffusionPipeline.from_pretrained(a.output_dir).to(t.rt.device)
    res = learning_check(pipe, progress=t.show_bar, callback=t.preemption.check, return_images=True)
    panels = [(f"guidance {res['guidance_scale']}", res.pop("samples"), res.pop("predictions"), res["targets"])]
    cond = learning_check(pipe, guidance_scale=1.0, progress=t.show_bar, callback=t.preemption.check,
                          return_images=True)
    panels.append(("guidance 1", cond.pop("samples"), cond.pop("predictions"), cond.pop("targets")))
    res["guidance_1"] = {k: cond[k] for k in ("agreement", "per_digit", "images", "num_inference_steps")}
    grid_path = os.path.join(a.output_dir, "learning_check.png")
    learning_check_picture(panels, res["per_digit_images"]).save(grid_path)
    t.rt.finished(grid_path)
    res.update(threshold=a.learning_check_min, passed=res["agreement"] >= a.learning_check_min,
               grid=os.path.basename(grid_path))
    res.pop("targets")
    print(f"Learning check: {res['agreement'] * 100:.1f}% of {res['images']} generated digits read as the prompt's "
          f"digit (guidance {res['guidance_scale']}, steps {res['num_inference_steps']}; picture: {grid_path})",
          flush=True)
    print(f"Learning check at guidance 1 (no classifier-free guidance): {cond['agreement'] * 100:.1f}% of "
          f"{cond['images']} read as the prompt's digit", flush=True)
    if not res["passed"]:
        print(f"Learning check FAILED: {res['agreement'] * 100:.1f}% is below the required "
              f"{a.learning_check_min * 100:.1f}% (--learning_check_min)", flush=True)
    return res


def learning_check_picture(panels, per_digit: int):
    """The check's grids side by side, each under its title (e.g. 'guidance 7.5', 'guidance 1')."""
    from PIL import Image, ImageDraw

    grids = [(title, learning_check_grid(images, preds, targets, per_digit)) for title, images, preds, targets in panels]
    title_h, gap = 16, 12
    width = sum(g.width for _, g in grids) + gap * (len(grids) - 1)
    out = Image.new("RGB", (width, title_h + max(g.height for _, g in grids)), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for title, g in grids:
        draw.text((x + 22, 2), title, fill="black")
        out.paste(g, (x, title_h))
        x += g.width + gap
    return out


def previous_parts(output_dir: str) -> list:
    """The parts of earlier runs into the same output folder (kept across resumes)."""
    try:
        with open(os.path.join(output_dir, SUMMARY_NAME)) as f:
            parts = json.load(f).get("parts") or []
        return parts if isinstance(parts, list) else []
    except (OSError, ValueError, AttributeError):
        return []


def write_summary(trainer, exit_reason: str, extra: Optional[dict] = None) -> dict:
    t = trainer
    a, rt = t.args, t.rt
    from ..device import device_name, peak_memory_bytes

    now = time.time()
    part = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t.started)),
            "seconds": now - t.started, "first_step": t.first_step + 1, "last_step": t.state.global_step,
            "exit_reason": exit_reason}
    parts = t.earlier_parts + [part]
    summary = {
        "task": t.task.name,
        "exit_reason": exit_reason,
        "steps": t.state.global_step,
        "max_train_steps": a.max_train_steps,
        "images_per_sec": t.meter.steady_fps if t.meter else 0.0,
        "final_loss": t.meter.final_loss if t.meter else float("nan"),
        "e2e_seconds": part["seconds"],
        "e2e_seconds_total": sum(p.get("seconds", 0.0) for p in parts),
        "parts": parts,
        "world_size": rt.world_size,
        "per_device_batch": a.train_batch_size,
        "global_batch": a.train_batch_size * a.gradient_accumulation_steps * rt.world_size,
        "device": a.device,
        "device_name": device_name(a.device),
        "mixed_precision": a.mixed_precision,
        "distributed": t.engine.distributed if t.engine else "none",
        "engine": t.engine.kind if t.engine else "none",
        "learning_rate": a.learning_rate,
        "peak_memory_bytes": peak_memory_bytes(a.device),
        "overflow_steps_skipped": t.precision.skipped if t.precision else 0,
        "bad_steps_skipped": t.state.bad_steps,
        "bad_images_skipped": t.state.bad_images,
        "cache": t.cache_info,
        "config": {k: v for k, v in vars(a).items() if k not in ("hub_token",)},
    }
    if getattr(t, "lr_changed_on_resume", None):
        summary["learning_rate_changed_on_resume"] = t.lr_changed_on_resume
    summary.update(t.task.summary_extra())
    summary.update(extra or {})
    if rt.is_main:
        write_json_atomic(os.path.join(a.output_dir, SUMMARY_NAME), summary)
        rt.finished(os.path.join(a.output_dir, SUMMARY_NAME))
        plot_history(t.state.history, os.path.join(a.output_dir, "train_curves.png"))
    return summary
