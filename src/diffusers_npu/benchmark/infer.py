"""Inference throughput harness: the plain diffusers Stable Diffusion pipeline versus our fast path.

Both variants run the same ``StableDiffusionPipeline`` object, built directly from a preset's components with
random weights (no downloads), in the same dtype (fp16 on CUDA/NPU, fp32 on CPU), scheduler and guidance:

``plain``
    The pipeline as diffusers builds it: stock attention processors, contiguous (NCHW) memory format, eager.
``ours``
    ``set_attention(unet/vae, "flash")`` (the device's fused attention), channels_last UNet and VAE, and on
    CUDA ``torch.compile(unet, mode="max-autotune")`` (Triton autotuning + CUDA graphs; ``--compile`` decides;
    off by default on CPU and NPU, where inductor brings no CUDA graphs).

Per variant and batch size: one warm-up call (``--warmup_steps`` denoising steps; compilation and CUDA-graph
recording happen there and are reported as the warm-up seconds), then ``--repeats`` timed calls of ``--steps``
steps. iterations/s is measured over the denoising loop only (device synchronised at the end of the first and
of the last step, as diffusers' progress bar would show it); seconds/image is the whole call (text encoding,
denoising, VAE decode) divided by the batch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

from . import common

VARIANTS = ("plain", "ours")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer_throughput.py",
        description="Stable Diffusion inference it/s and s/image: plain diffusers pipeline vs the diffusers-npu "
                    "fast path, on a randomly initialised preset (no downloads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="sd21-base", choices=("tiny", "digits", "sd15", "sd21-base", "sd21"))
    p.add_argument("--resolution", type=int, default=None, help="image side; default: the preset's")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per timed call")
    p.add_argument("--batch_sizes", default="1,4", help="comma-separated images per call")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per variant and batch size")
    p.add_argument("--warmup_steps", type=int, default=3, help="denoising steps of the untimed warm-up call")
    p.add_argument("--variants", default="plain,ours", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights and compute dtype of both variants; auto = fp16 on CUDA/NPU, fp32 on CPU")
    p.add_argument("--attention", default="flash", choices=["auto", "flash", "upcast", "default"],
                   help="our variant's attention (diffusers_npu.set_attention)")
    p.add_argument("--channels_last", default=True, action=argparse.BooleanOptionalAction,
                   help="our variant: channels_last UNet and VAE")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="our variant: torch.compile the UNet; auto = on for CUDA only")
    p.add_argument("--compile_mode", default="max-autotune",
                   help="torch.compile mode ('max-autotune' = autotuned kernels + CUDA graphs)")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--scheduler", default="DDIMScheduler", help="diffusers scheduler class for both variants")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 on CPU (multi-threaded kernels on small tensors are slower "
                        "and erratic on a shared machine), torch's choice elsewhere")
    p.add_argument("--seed", type=int, default=0)
    return p


def build_pipeline(preset_name: str, seed: int, tmp: str, scheduler: str = "DDIMScheduler"):
    import diffusers
    from diffusers import StableDiffusionPipeline

    from ..presets import build_components, build_tokenizer, get_preset

    preset = get_preset(preset_name)
    comps = build_components(preset_name, seed=seed, tokenizer_dir=os.path.join(tmp, "tokenizer"))
    tokenizer = comps["tokenizer"] or build_tokenizer(os.path.join(tmp, "tokenizer"),
                                                      max_length=preset.tokenizer_max_length)
    sched = getattr(diffusers, scheduler).from_config(comps["noise_scheduler"].config)
    pipe = StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=tokenizer,
                                   unet=comps["unet"], scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, preset


def make_fast(pipe, device: str, attention: str, channels_last: bool, compile_unet: bool, compile_mode: str):
    """Our inference fast path, applied in place. Returns a description of what was done."""
    from ..attention import set_attention

    done = [f"attention={attention}"]
    set_attention(pipe.unet, attention)
    set_attention(pipe.vae, attention)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if compile_unet:
        kw = {"dynamic": False}
        if compile_mode:
            kw["mode"] = compile_mode
        pipe.unet = torch.compile(pipe.unet, **kw)
        done.append(f"torch.compile(mode={compile_mode})")
    return ", ".join(done)


def measure(pipe, device: str, batch: int, resolution: int, steps: int, warmup_steps: int, repeats: int,
            guidance_scale: float, seed: int) -> dict:
    prompts = ["a photo of the handwritten digit seven in the style of a picture"] * batch
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

    device = common.resolve_device(a.device)
    accel = device != "cpu"
    dtype_name = a.dtype if a.dtype != "auto" else ("fp16" if accel else "fp32")
    if dtype_name == "bf16" and not supports_bf16(device):
        raise SystemExit(f"error: --dtype bf16 is not supported on this {device}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    batches = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not batches or min(batches) < 1 or a.steps < 2 or a.repeats < 1:
        raise SystemExit("error: --batch_sizes must be >= 1, --steps >= 2, --repeats >= 1")
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"error: --variants: choose from {','.join(VARIANTS)}")
    compile_unet = a.compile == "on" or (a.compile == "auto" and device == "cuda")

    tmp = tempfile.mkdtemp(prefix="dnpu-bench-infer-")
    try:
        pipe, preset = build_pipeline(a.preset, a.seed, tmp, a.scheduler)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    resolution = a.resolution or preset.resolution
    if resolution % 8:
        raise SystemExit(f"error: --resolution must be divisible by 8 (got {resolution})")
    pipe.to(device)
    pipe.unet.to(dtype=dtype)
    pipe.vae.to(dtype=dtype)
    pipe.text_encoder.to(dtype=dtype)
    env = common.environment(device)
    print(f"infer_throughput: preset {a.preset}, {resolution} px, {a.steps} steps, batches {batches}, {dtype_name}, "
          f"{a.scheduler}, guidance {a.guidance_scale}, device {env['device_name']}", flush=True)

    rows = []
    for variant in VARIANTS:
        if variant not in variants:
            continue
        how = "diffusers defaults"
        if variant == "ours":
            how = make_fast(pipe, device, a.attention, a.channels_last, compile_unet, a.compile_mode)
        for batch in batches:
            try:
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
                common.write_json(a.json, _result(a, rows, resolution, batches, dtype_name, compile_unet, device,
                                                  env))

    result = _result(a, rows, resolution, batches, dtype_name, compile_unet, device, env)
    return common.publish(result, format_results(result), a.json)


def _result(a, rows, resolution, batches, dtype_name, compile_unet, device, env) -> dict:
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
                   "channels_last": a.channels_last, "compile": compile_unet, "compile_mode": a.compile_mode,
                   "seed": a.seed},
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
