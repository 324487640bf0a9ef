"""One run: :func:`run` = :func:`~.plan.prepare` (validation, no weights) -> :func:`~.loading.load_pipeline`
(+ refiner, textual-inversion token) -> :func:`generate` (one pipeline call per image, image ``i`` seeded with
``seed + i`` through a CPU ``torch.Generator``, so the noise is identical on every device) -> PNG + JSON
sidecar per image through :class:`~.outputs.OutputWriter`.

A run delivers all requested images or none: an error, Ctrl-C, SIGTERM or a full disk removes every file
this run wrote (and ``--output_dir`` if it created it). :func:`entry` turns the outcome into one line and an
exit status: 0; 2 for bad input or a full disk (``error: ...``); 130 after Ctrl-C and 143 after SIGTERM.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Callable, List, Optional

from ..cliutil import run_main
from . import loading
from .outputs import OutputWriter, Terminated, sigterm_unwinds, to_pil
from .plan import Plan, prepare, say, warn


def _safety_state(pipe, plan: Plan) -> Optional[str]:
    components = getattr(pipe, "components", {})
    if "safety_checker" not in components:
        return None  # the pipeline class has no safety checker (LDM, DDPM, SDXL, ...)
    if components["safety_checker"] is not None:
        return "enabled"
    return "disabled" if plan.disable_safety_checker else "absent"


def _nsfw_flag(output) -> Optional[bool]:
    nsfw = getattr(output, "nsfw_content_detected", None)
    if isinstance(nsfw, (list, tuple)) and nsfw and nsfw[0] is not None:
        return bool(nsfw[0])
    return None


def generate(plan: Plan, pipe, writer: Optional[OutputWriter] = None, refiner=None) -> List[str]:
    """Generate ``plan.num_images`` images with ``pipe`` (finished by ``refiner`` when given); write PNG +
    sidecar each through ``writer`` (a new one, rolled back on failure, when None). Returns the PNG paths."""
    import torch
    from tqdm.auto import tqdm

    from .. import device as _device

    if writer is None:
        with OutputWriter(plan.output_dir) as own:
            return generate(plan, pipe, own, refiner)
    safety = _safety_state(pipe, plan)
    paths = []
    bar = tqdm(range(plan.num_images), desc=plan.task, unit="image", disable=plan.num_images == 1)
    for i in bar:
        seed = plan.seed + i
        _device.seed_everything(seed)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pipe.set_progress_bar_config(desc=f"image {i + 1}/{plan.num_images}", leave=False)
        _device.synchronize(plan.device)
        start = time.perf_counter()
        output = pipe(**plan.call_kwargs, generator=generator)
        if refiner is not None:
            refiner.set_progress_bar_config(desc=f"refiner {i + 1}/{plan.num_images}", leave=False)
            output = refiner(**plan.refiner_kwargs, image=output.images, generator=generator)
        _device.synchronize(plan.device)
        seconds = time.perf_counter() - start
        image = to_pil(output.images[0])
        nsfw = _nsfw_flag(output)
        if nsfw:
            warn(f"image {i + 1}: the safety checker flagged it (NSFW) and blanked it")
        meta = dict(plan.metadata)
        meta.update(seed=seed, index=i, width=image.size[0], height=image.size[1], seconds=round(seconds, 4),
                    safety_checker=safety, nsfw_content_detected=nsfw,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        path = writer.write(f"{plan.task}-seed{seed}", image, meta)
        paths.append(path)
        bar.write(f"saved {path}", file=sys.stdout)
    return paths


def load_for_plan(plan: Plan):
    """The pipeline (and refiner, or None) of ``plan``, with the speed-ups applied."""
    pipe = loading.load_pipeline(
        plan.model, task=plan.task, device=plan.device, dtype=plan.dtype, attention=plan.attention,
        disable_safety_checker=plan.disable_safety_checker, compile=plan.compile,
        depth_estimator=plan.depth_estimator, pipeline_class=plan.pipeline_class, components=plan.components,
        controlnet=plan.controlnet, controlnet_class=plan.controlnet_class, lora=plan.lora, lora_scale=plan.lora_scale,
        local_files_only=plan.local_files_only, controlnet_local_files_only=plan.controlnet_cache_only,
    )
    if plan.embedding is not None:
        tokens = loading.apply_learned_embeds(pipe, *plan.embedding)
        say(f"loaded textual-inversion token {plan.embedding[0]} ({len(tokens)} vector(s))")
    refiner = None
    if plan.refiner:
        refiner = loading.load_refiner(plan.refiner, plan.device, plan.dtype, plan.attention, plan.compile,
                                       local_files_only=plan.refiner_cache_only)
    return pipe, refiner


def run(args: argparse.Namespace) -> List[str]:
    """Validate, load, generate. Returns the written PNG paths. Raises a DiffusersNpuError for bad input,
    :class:`Terminated` after SIGTERM (with ``.removed`` = files removed again)."""
    with sigterm_unwinds():
        plan = prepare(args)
        start = time.perf_counter()
        with warnings.catch_warnings(), loading.library_noise_filtered():
            # Noise that is not the user's business: tiny/old scheduler configs, and depth2img's fp32 autocast.
            warnings.filterwarnings("ignore", message=".*steps_offset.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
            pipe, refiner = load_for_plan(plan)
            extra = f" + refiner {plan.refiner}" if refiner is not None else ""
            say(f"loaded {type(pipe).__name__} from {plan.model}{extra} on {plan.device} ({plan.dtype}) "
                f"in {time.perf_counter() - start:.1f}s")
            writer = OutputWriter(plan.output_dir)
            paths = None
            try:
                with writer:
                    paths = generate(plan, pipe, writer, refiner)
            except (KeyboardInterrupt, Terminated) as exc:
                # After the writer closed, every image is complete and stays; before, all were removed.
                exc.removed = writer.removed
                exc.kept = len(paths) if paths is not None and not writer.removed else 0
                raise
    say(f"{len(paths)} image(s) written to {plan.output_dir}")
    return paths


def _stopped(what: str, exc: BaseException) -> str:
    removed, kept = getattr(exc, "removed", 0), getattr(exc, "kept", 0)
    if kept:
        return f"{what} after the run had finished; its {kept} image(s) are complete and kept"
    tail = f"removed the {removed} file(s) this run had written" if removed else "no image was written"
    return f"{what}; {tail}"


def stop_lines(body: Callable[[], object]) -> int:
    """Run ``body``; Ctrl-C and SIGTERM become one line and exit status 130 / 143 (no traceback)."""
    try:
        body()
    except Terminated as exc:
        say(_stopped("terminated (SIGTERM)", exc))
        return 143
    except KeyboardInterrupt as exc:
        say(_stopped("interrupted", exc))
        return 130
    return 0


def entry(args_factory: Callable[[], argparse.Namespace]) -> int:
    """Entry point body of the scripts: parse, run, one line for every way a run can end."""
    return run_main(lambda: stop_lines(lambda: run(args_factory())))


__all__ = ["entry", "generate", "load_for_plan", "run", "stop_lines"]
