"""Inference throughput harness: the plain diffusers pipeline versus what ``diffusers-npu generate`` runs.

The preset's architecture is built with random weights (no downloads), saved as a pipeline folder in the run's
dtype (:func:`diffusers_npu.presets.save_pipeline_folder`: StableDiffusionPipeline, or StableDiffusionXLPipeline
for ``sdxl`` / ``sdxl-tiny``), and loaded with the SAME function ``generate`` uses
(:func:`diffusers_npu.inference.load_pipeline`: device, dtype). Both variants then run that one pipeline
object, with the same scheduler and guidance:

``plain``
    The pipeline as diffusers loads it: stock attention processors, contiguous (NCHW) memory format, eager.
``ours``
    After :func:`diffusers_npu.inference.speed_up` -- THE speed-up function of ``generate`` and the
    ``test_infer`` scripts -- with ``--attention``, ``--channels_last`` (auto: generate's policy) and
    ``--compile`` (auto = on for CUDA only, mode ``max-autotune``: Triton autotuning + CUDA graphs).

The JSON records the equivalent ``diffusers-npu generate`` command of the ``ours`` variant.

Per variant and batch size: one warm-up call (``--warmup_steps`` denoising steps; compilation and CUDA-graph
recording happen there and are reported as the warm-up seconds), then ``--repeats`` timed calls of ``--steps``
steps. iterations/s is measured over the denoising loop only (device synchronised at the end of the first and
of the last step, as diffusers' progress bar would show it); seconds/image is the whole call (text encoding,
denoising, VAE decode) divided by the batch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time

import torch

from ..presets import PRESETS
from . import common

VARIANTS = ("plain", "ours")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer_throughput.py",
        description="Stable Diffusion (XL) inference it/s and s/image: plain diffusers pipeline vs what "
                    "diffusers-npu generate runs, on a randomly initialised preset (no downloads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="sd21-base", choices=PRESETS, help="architecture (random weights)")
    p.add_argument("--resolution", type=int, default=None, help="image side; default: the preset's")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per timed call")
    p.add_argument("--batch_sizes", default="1,4", help="comma-separated images per call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per variant and batch size")
    p.add_argument("--warmup_steps", type=int, default=3, help="denoising steps of the untimed warm-up call")
    p.add_argument("--variants", default="plain,ours", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"], help="where to run")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights and compute dtype of both variants; auto = fp16 on CUDA/NPU, fp32 on CPU")
    p.add_argument("--attention", default="flash", choices=["auto", "flash", "upcast", "default"],
                   help="our variant's attention (generate's --attention; auto is the same as flash on CUDA and "
                        "on NPU in half precision)")
    p.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                   help="our variant: channels_last UNet/VAE; auto = generate's policy (on for CUDA or when "
                        "compiling)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="our variant: torch.compile the UNet (generate's --compile); auto = on for CUDA only")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode; default: generate's ('max-autotune' on CUDA = autotuned kernels + "
                        "CUDA graphs, torch's default elsewhere)")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default=None,
                   help="diffusers scheduler class for both variants; default: the one save_pipeline_folder "
                        "gives the preset (DDIM for SD, Euler for SDXL)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 on CPU (multi-threaded kernels on small tensors are slower "
                        "and erratic on a shared machine), torch's choice elsewhere")
    p.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    return p


def build_pipeline(preset_name: str, seed: int, tmp: str, device: str, dtype_name: str,
                   scheduler: str | None = None):
    """The preset as a pipeline folder in ``tmp``, loaded by ``generate``'s loader without speed-ups."""
    from ..inference import load_pipeline, torch_dtype
    from ..presets import get_preset, write_preset_folder

    folder = write_preset_folder(preset_name, os.path.join(tmp, "model"), seed=seed, dtype=torch_dtype(dtype_name),
                                 scheduler=scheduler, work_dir=tmp)
    pipe = load_pipeline(folder, task="text-to-image", device=device, dtype=dtype_name, speed=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, get_preset(preset_name)


def generate_command(a, resolution: int, dtype_name: str, compile_unet: bool, device: str) -> str:
    """The commands that run what the ``ours`` variant measures (``generate`` makes one image a call)."""
    folder = f"{a.preset}-seed{a.seed}"
    make = f"python -m diffusers_npu.presets {a.preset} {folder} --seed {a.seed}"
    if a.scheduler_flag:
        make += f" --scheduler {a.scheduler_flag}"
    argv = ["diffusers-npu", "generate", "text-to-image", "--model", folder,
            "--prompt", PROMPT, "--device", device, "--dtype", dtype_name, "--attention", a.attention,
            "--num_inference_steps", str(a.steps), "--guidance_scale", str(a.guidance_scale),
            "--height", str(resolution), "--width", str(resolution)]
    if compile_unet:
        argv.append("--compile")
    return f"{make} && " + " ".join(shlex.quote(x) for x in argv)


PROMPT = "a photo of the handwritten digit seven in the style of a picture"


def measure(pipe, device: str, batch: int, resolution: int, steps: int, warmup_steps: int, repeats: int,
            guidance_scale: float, seed: int) -> dict:
    prompts = [PROMPT] * batch
    marks = {}

    def on_step_end(p, i, t, kwargs):
        if i == 0 or i == marks["last"]:
            common.sync(device)
            marks[i] = time.perf_counter()
        return kwargs

    def call(n_steps, timed):
        marks.clear()
        marks["last"] = n_steps - 1
        g = torch.Generator("cpu").manual_seed(seed)
        common.sync(device)
        t0 = time.perf_counter()
        pipe(prompts, num_inference_steps=n_steps, height=resolution, width=resolution, generator=g,
             guidance_scale=guidance_scale, output_type="np",
             callback_on_step_end=on_step_end if timed else None)
        common.sync(device)
        wall = time.perf_counter() - t0
        loop = marks.get(n_steps - 1, 0) - marks.get(0, 0)
        return wall, (n_steps - 1) / loop if timed and n_steps > 1 and loop > 0 else None

    common.reset_memory(device)
    warm, _ = call(max(1, warmup_steps), False)
    walls, rates = [], []
    for _ in range(repeats):
        wall, rate = call(steps, True)
        walls.append(wall)
        if rate:
            rates.append(rate)
    wall = sum(walls) / len(walls)
    return {"batch": batch, "its_per_sec": sum(rates) / len(rates) if rates else steps / wall,
            "seconds_per_image": wall / batch, "seconds_per_call": wall, "warmup_s": warm,
            "peak_memory_bytes": common.peak_memory(device)}


def main(argv=None) -> dict:
    return common.run_on_device(build_parser().parse_args(argv), _main)


def _main(a) -> dict:
    from ..device import supports_bf16
    from ..inference import library_noise_filtered, speed_up
    from ..inference.speedup import channels_last_policy

    device = a.device  # resolved by common.run_on_device
    accel = device != "cpu"
    dtype_name = a.dtype if a.dtype != "auto" else ("fp16" if accel else "fp32")
    if dtype_name == "bf16" and not supports_bf16(device):
        raise SystemExit(f"error: --dtype bf16 is not supported on this {device}")
    batches = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not batches or min(batches) < 1 or a.steps < 2 or a.repeats < 1:
        raise SystemExit("error: --batch_sizes must be >= 1, --steps >= 2, --repeats >= 1")
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"error: --variants: choose from {','.join(VARIANTS)}")
    if a.channels_last == "on" and device == "npu":
        # as training refuses it: torch_npu's _to_copy accepts only contiguous/preserve formats
        raise SystemExit("error: --channels_last on is not supported on NPU (torch_npu refuses the memory format)")
    compile_unet = a.compile == "on" or (a.compile == "auto" and device == "cuda")
    channels_last = {"on": True, "off": False}.get(a.channels_last, channels_last_policy(device, compile_unet))

    tmp = tempfile.mkdtemp(prefix="dnpu-bench-infer-")
    try:
        with library_noise_filtered():
            pipe, preset = build_pipeline(a.preset, a.seed, tmp, device, dtype_name, a.scheduler)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    resolution = a.resolution or preset.resolution
    if resolution % 8:
        raise SystemExit(f"error: --resolution must be divisible by 8 (got {resolution})")
    a.scheduler_flag, a.scheduler = a.scheduler, type(pipe.scheduler).__name__
    env = common.environment(device)
    print(f"infer_throughput: preset {a.preset}, {resolution} px, {a.steps} steps, batches {batches}, {dtype_name}, "
          f"{a.scheduler}, guidance {a.guidance_scale}, device {env['device_name']}", flush=True)

    rows = []
    command = generate_command(a, resolution, dtype_name, compile_unet, device)
    for variant in VARIANTS:
        if variant not in variants:
            continue
        how = "diffusers defaults"
        if variant == "ours":
            how = ", ".join(speed_up(pipe, device, attention=a.attention, channels_last=channels_last,
                                     compile=compile_unet, compile_mode=a.compile_mode, quiet=True))
        for batch in batches:
            try:
                with library_noise_filtered():
                    r = measure(pipe, device, batch, resolution, a.steps, a.warmup_steps, a.repeats,
                                a.guidance_scale, a.seed)
                print(f"  {variant} batch {batch}: {r['its_per_sec']:.2f} it/s, {r['seconds_per_image']:.3f} "
                      f"s/image (warm-up {r['warmup_s']:.1f} s)", flush=True)
            except Exception as e:  # keep the other rows (OOM, compile failure)
                r = {"batch": batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                print(f"  {variant} batch {batch}: FAILED {r['error']}", file=sys.stderr, flush=True)
            r.update(variant=variant, setup=how)
            rows.append(r)
            if a.json:  # results so far, so a run cut short by a time limit still leaves its figures
                common.write_json(a.json, _result(a, rows, resolution, batches, dtype_name, compile_unet,
                                                  channels_last, device, env, command))

    result = _result(a, rows, resolution, batches, dtype_name, compile_unet, channels_last, device, env, command)
    return common.publish(result, format_results(result), a.json)


def _result(a, rows, resolution, batches, dtype_name, compile_unet, channels_last, device, env, command) -> dict:
    for r in rows:
        base = next((p for p in rows if p["variant"] == "plain" and p["batch"] == r["batch"]
                     and "its_per_sec" in p), None)
        if "its_per_sec" in r:
            r["vs_plain"] = r["its_per_sec"] / base["its_per_sec"] if base else None
    return {
        "benchmark": "infer_throughput",
        "config": {"preset": a.preset, "resolution": resolution, "steps": a.steps, "batch_sizes": batches,
                   "repeats": a.repeats, "warmup_steps": a.warmup_steps, "dtype": dtype_name,
                   "scheduler": a.scheduler, "guidance_scale": a.guidance_scale, "attention": a.attention,
                   "channels_last": channels_last, "compile": compile_unet, "compile_mode": a.compile_mode,
                   "seed": a.seed},
        # what users run to get the "ours" figures (generate makes one image a call: batch 1)
        "generate_command": command,
        "peak_memory_kind": common.memory_kind(device).replace("during the mode", "during the measurement"),
        "environment": env,
        "runs": rows,
    }


HEADERS = ("variant", "batch", "it/s", "s/image", "vs plain", "warm-up s", "peak mem")


def format_results(result: dict, markdown: bool = False) -> str:
    c = result["config"]
    rows, notes = [], []
    for r in result["runs"]:
        if "its_per_sec" not in r:
            rows.append([r["variant"], r["batch"], "FAILED", "-", "-", "-", "-"])
            notes.append(f"{r['variant']} batch {r['batch']}: {r['error']}")
            continue
        rows.append([r["variant"], r["batch"], common.fmt_num(r["its_per_sec"], 2),
                     common.fmt_num(r["seconds_per_image"], 3),
                     f"{r['vs_plain']:.2f}x" if r.get("vs_plain") else "-", common.fmt_num(r["warmup_s"]),
                     common.fmt_bytes(r["peak_memory_bytes"])])
    setups = {r["variant"]: r["setup"] for r in result["runs"]}
    head = (f"preset {c['preset']} @ {c['resolution']} px, {c['steps']} steps, {c['dtype']}, {c['scheduler']}, "
            f"guidance {c['guidance_scale']} on {result['environment']['device_name']}")
    notes += [f"{v}: {s}" for v, s in setups.items()]
    notes.append(f"peak mem: {result['peak_memory_kind']}")
    return "\n".join([head, common.format_table(HEADERS, rows, markdown=markdown)] + notes)


if __name__ == "__main__":
    main()
