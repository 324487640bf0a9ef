"""The diffusion-transformer rows of the training harness (issue #21 item 9): SD3 / FLUX.1 DreamBooth, full
fine-tuning and LoRA, timed with the same real step as the UNet rows -- ``Trainer.train_step`` of the Trainer
that ``examples/dreambooth/train_dreambooth_sd3.py`` (``dreambooth_sd3``), ``train_dreambooth_lora_sd3.py``,
``train_dreambooth_flux.py`` and ``train_dreambooth_lora_flux.py`` build from the recorded command line.

Presets (``--preset``):

``sd3-tiny``, ``flux-tiny``               diffusers' own pipeline-test sizes (:mod:`diffusers_npu.tiny_pipelines`
                                          ``sd3`` / ``flux``): the CPU smoke of ``bench/gpu_run.sh``
``sd3-medium``, ``sd35-large``, ``flux1-dev``  the published transformer and VAE configs
                                          (:mod:`diffusers_npu.dit_presets`), random weights; ``--dit_depth D[,S]``
                                          keeps D transformer blocks (FLUX: D double-stream, S single-stream)

Text encoders of the real-size presets have the published widths (CLIP ViT-L 768, OpenCLIP bigG 1280, T5-XXL
4096) but ONE layer each and a small whole-word vocabulary: the DreamBooth step never runs them. Each distinct
caption is encoded once during set-up (the task's prompt table, or the latent cache with ``--cache_latents``),
then every text encoder leaves the device; the transformer sees prompt states of the real shapes (SD3: 77 CLIP +
``--max_sequence_length`` T5 tokens x 4096 and a 2048 pooled vector; FLUX: the T5 tokens x 4096 and CLIP-L's 768).
Images come from ``--instance_data_dir`` (the harness's image folder; every image with ``--instance_prompt``).

FLOPs (``TFLOP/s``, ``% peak``): the transformer's forward + backward at the row's resolution and T5 length,
plus the VAE encoder when it runs in the step (not with ``--cache_latents``); the text encoders are not in the
step and not counted. With ``--dit_depth`` the row is a reduced-depth model: its FLOPs are the reduced model's,
and ``projected_full_depth_images_per_sec_per_device`` says what the full-depth step would give at the same
TFLOP/s per device -- a FLOPs projection, not a measurement.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UsageError

TINY = {"sd3-tiny": ("sd3", "sd3"), "flux-tiny": ("flux", "flux")}  # preset -> (family, tiny_pipelines kind)
REAL = ("sd3-medium", "sd35-large", "flux1-dev")
PRESETS = tuple(TINY) + REAL
#: (family, kind) -> the DreamBooth task whose Trainer step a mode times
TASKS = {("sd3", "full"): "dreambooth_sd3", ("sd3", "lora"): "dreambooth_lora_sd3",
         ("flux", "full"): "dreambooth_flux", ("flux", "lora"): "dreambooth_lora_flux"}
#: modes: kind and flags (the LoRA modes use the LoRA script; it has no --use_lora flag)
MODES = {"online": ("full", []), "cached": ("full", ["--cache_latents"]),
         "compiled": ("full", ["--cache_latents", "--compile"]), "lora": ("lora", [])}
DEFAULT_MODES = ("online", "lora")
TEXT_LAYERS = 1
FORMAT = 1


@dataclass(frozen=True)
class DiTBench:
    """What the harness needs of a DiT preset."""

    preset: str
    family: str  # sd3 / flux
    tiny: bool
    resolution: int  # default --resolution
    depth: Optional[tuple]  # (double, single) blocks kept (FLUX) or (blocks,) (SD3); None: the full depth
    full_depth: Optional[tuple]

    @property
    def folder_name(self) -> str:
        return f"model-{self.preset}" + (f"-d{'-'.join(map(str, self.depth))}" if self.depth else "")

    def transformer_changes(self) -> dict:
        if not self.depth:
            return {}
        return dict(num_layers=self.depth[0], **({"num_single_layers": self.depth[1]} if self.family == "flux" else {}))

    def describe_depth(self) -> Optional[str]:
        if not self.depth:
            return None
        if self.family == "flux":
            return (f"{self.depth[0]} of {self.full_depth[0]} double-stream + {self.depth[1]} of {self.full_depth[1]} "
                    f"single-stream transformer blocks")
        return f"{self.depth[0]} of {self.full_depth[0]} transformer blocks"


def is_dit(preset: str) -> bool:
    return preset in PRESETS


def bench_info(preset: str, depth: Optional[str]) -> DiTBench:
    if preset in TINY:
        if depth:
            raise UsageError(f"--dit_depth applies to the real-size presets ({', '.join(REAL)}), not {preset}")
        return DiTBench(preset, TINY[preset][0], True, 16, None, None)
    from ..dit_presets import get_dit_preset

    p = get_dit_preset(preset)
    t = p.transformer
    full = (t["num_layers"], t["num_single_layers"]) if p.family == "flux" else (t["num_layers"],)
    kept = None
    if depth:
        try:
            kept = tuple(int(x) for x in depth.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--dit_depth: expected D or D,S (block counts), got {depth!r}") from None
        if p.family == "flux" and len(kept) == 1:  # single-stream blocks in FLUX.1's proportion (38 per 19)
            kept = (kept[0], round(kept[0] * full[1] / full[0]))
        if len(kept) != len(full) or not all(1 <= k <= f for k, f in zip(kept, full)):
            raise UsageError(f"--dit_depth {depth}: {preset} has {','.join(map(str, full))} blocks; give "
                             f"{'D,S (double, single)' if p.family == 'flux' else 'D'} with 1 <= each <= that")
        kept = None if kept == full else kept
    return DiTBench(preset, p.family, False, p.resolution, kept, full)


def mode_spec(a, name: str) -> dict:
    """Task, kind and flags of a mode for a DiT preset (``--flags`` with ``--use_lora`` -> the LoRA script)."""
    fam = a.dit.family
    if name.startswith("flags"):
        i = 0 if name == "flags" else int(name[5:]) - 1
        flags = shlex.split(a.flags[i])
        kind = "lora" if "--use_lora" in flags else "full"
        return {"task": a.task or TASKS[(fam, kind)], "kind": kind, "flags": [f for f in flags if f != "--use_lora"]}
    if name not in MODES:
        return {"task": None, "kind": name, "flags": [],
                "skipped": f"the DiT rows time DreamBooth (modes {', '.join(MODES)}); {name} is a UNet row"}
    kind, flags = MODES[name]
    return {"task": a.task if a.task and kind == "full" else TASKS[(fam, kind)], "kind": kind, "flags": list(flags)}


# ------------------------------------------------------------------------------------------------ fixture
def _text_parts(work: str, widths: tuple, dtype) -> dict:
    """Tokenizers and ONE-layer text encoders of the published widths (the step never runs them)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..presets import EMBEDDED_WORDS, build_tokenizer
    from ..t5_tokenizer import build_t5_tokenizer
    from ..tiny_pipelines import TEST_WORDS

    words = tuple(dict.fromkeys(EMBEDDED_WORDS + TEST_WORDS))
    clip_tok = build_tokenizer(os.path.join(work, "clip_tokenizer"), words, max_length=77)
    t5_tok = build_t5_tokenizer(words)
    n = len(clip_tok)
    out = {}
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    for name, (kind, cfg) in zip(names, widths):
        if kind == "t5":
            model = T5EncoderModel(T5Config(**dict(cfg, num_layers=TEXT_LAYERS, vocab_size=max(1000, len(t5_tok)),
                                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)))
            tok = t5_tok
        else:
            cls = CLIPTextModelWithProjection if kind == "clip_projection" else CLIPTextModel
            model = cls(CLIPTextConfig(**dict(cfg, num_hidden_layers=TEXT_LAYERS, vocab_size=max(1000, n),
                                              bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)))
            tok = clip_tok
        out[name] = model.to(dtype)
        out["tokenizer" + name[len("text_encoder"):]] = tok
    return out


def _real_pipeline(info: DiTBench, work: str, seed: int, device: str):
    """The preset's transformer (bf16 on disk: the tasks load it in fp32 for full fine-tuning, in the autocast
    dtype under LoRA), its VAE (fp32, as the tasks run it) and one-layer text encoders (bf16)."""
    import diffusers

    from ..dit_presets import get_dit_preset

    p = get_dit_preset(info.preset)
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = p.transformer_class()(**dict(p.transformer, **info.transformer_changes())).to(torch.bfloat16)
        vae = diffusers.AutoencoderKL(**p.vae)
        text = _text_parts(work, p.text_encoders, torch.bfloat16)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**p.scheduler)
    cls = diffusers.FluxPipeline if p.family == "flux" else diffusers.StableDiffusion3Pipeline
    return cls(transformer=transformer, vae=vae, scheduler=scheduler, **text)


def model_folder(work_dir: str, info: DiTBench, seed: int = 0, build_device: str = "cpu") -> tuple[str, float]:
    """``<work_dir>/model-<preset>[-d<depth>]``: an SD3 / FLUX pipeline folder with random weights (seeded), as a
    user's ``--pretrained_model_name_or_path``; reused when its stamp matches. Returns the folder and the seconds
    spent building it (0 when reused). Real-size models are initialised on the accelerator when there is one."""
    import gc

    from . import common
    from .fixture import _fresh, _install, _stamp_matches

    folder = os.path.join(work_dir, info.folder_name)
    stamp = {"kind": "dit-model", "preset": info.preset, "depth": list(info.depth or ()), "seed": seed,
             "text_layers": TEXT_LAYERS, "format": FORMAT}
    if _stamp_matches(folder, stamp):
        return folder, 0.0
    t0 = time.perf_counter()
    tmp = _fresh(folder)
    try:
        if info.tiny:
            from ..presets import build_test_pipeline

            build_test_pipeline(TINY[info.preset][1], tmp, seed)
        else:
            scratch = os.path.join(tmp, "_tokenizer_src")
            try:
                pipe = _real_pipeline(info, scratch, seed, build_device)
            except Exception:  # an accelerator that cannot initialise it: the same shapes, on CPU
                if build_device == "cpu":
                    raise
                pipe = _real_pipeline(info, scratch, seed, "cpu")
            pipe.to("cpu")  # saved from host memory whatever the safetensors version; frees the device
            pipe.save_pretrained(tmp, safe_serialization=True)
            del pipe
            shutil.rmtree(scratch, ignore_errors=True)
            gc.collect()
            common.reset_memory(build_device)
        return _install(tmp, folder, stamp), time.perf_counter() - t0
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fixture_notes(info: DiTBench) -> list:
    """What the output says about a DiT fixture."""
    notes = []
    if info.tiny:
        notes.append(f"{info.preset}: diffusers' pipeline-test sizes (tiny_pipelines '{TINY[info.preset][1]}'), "
                     f"random weights: proves the path, measures nothing")
    else:
        notes.append(f"{info.preset}: the published transformer and VAE configs, random weights; text encoders of "
                     f"the published widths but {TEXT_LAYERS} layer each -- the step never runs them: each caption is "
                     f"encoded once during set-up and the encoders leave the device")
    if info.depth:
        notes.append(f"{info.preset} REDUCED DEPTH: {info.describe_depth()} (published widths); its images/s is "
                     f"this smaller model's, and 'full depth (projected)' is what the full-depth step would give at "
                     f"the same TFLOP/s per device: a FLOPs projection, not a measurement")
    return notes


# ------------------------------------------------------------------------------------------------- FLOPs
def _config(folder: str, sub: str) -> dict:
    with open(os.path.join(folder, sub, "config.json")) as f:
        return json.load(f)


def count_flops(a, model_dir: str, resolution: int, kind: str, text_len: int) -> dict:
    """Per-image FLOPs of the row's step from the model folder's configs (``{kind}_fwd_bwd``,
    ``vae_encoder_fwd``); with ``--dit_depth`` also ``{kind}_fwd_bwd_full_depth`` (the published depth)."""
    from ..train.dit import FAMILIES
    from .flops import count_dit_step_flops

    fam = a.dit.family
    targets = FAMILIES[fam].lora_targets  # the LoRA scripts' default adapters
    transformer, vae = _config(model_dir, "transformer"), _config(model_dir, "vae")
    out = count_dit_step_flops(fam, transformer, vae, resolution, text_len, kinds=(kind,), lora_targets=targets)
    if a.dit.depth:
        from ..dit_presets import get_dit_preset

        full = count_dit_step_flops(fam, get_dit_preset(a.dit.preset).transformer, vae, resolution, text_len,
                                    kinds=(kind,), lora_targets=targets)
        out[f"{kind}_fwd_bwd_full_depth"] = full[f"{kind}_fwd_bwd"]
    out["text_encoder_fwd"] = 0  # once per caption during set-up, never in the step
    return out


def add_flops(a, row: dict, counts, kind: str) -> None:
    """TFLOP/s per device of what a DiT row's step executes: the transformer's forward + backward, plus the VAE
    encoder unless latents are cached; with ``--dit_depth`` the full-depth projection."""
    resolved = row.get("resolved") or {}
    res = resolved.get("resolution") or a.resolution
    text_len = resolved.get("max_sequence_length") or 77
    c = counts(res, kind, text_len)
    if c.get(f"{kind}_fwd_bwd") is None:
        row.update(flops_per_image=None, tflops_per_device=None, pct_of_peak=None)
        return
    vae = 0 if resolved.get("cache_latents") else c["vae_encoder_fwd"]
    per_image = c[f"{kind}_fwd_bwd"] + vae
    row["flops_per_image"] = per_image
    row["flops_counted"] = ("transformer fwd+bwd" + (" + VAE encoder" if vae else "") +
                            f" at {res} px, {text_len} T5 tokens; text encoders not in the step")
    row["tflops_per_device"] = per_image * row["images_per_sec_per_device"] / 1e12
    row["pct_of_peak"] = 100.0 * row["tflops_per_device"] / a.peak_tflops if a.peak_tflops else None
    full = c.get(f"{kind}_fwd_bwd_full_depth")
    if full:
        row["full_depth_flops_per_image"] = full + vae
        row["projected_full_depth_images_per_sec_per_device"] = row["tflops_per_device"] * 1e12 / (full + vae)
        row["reduced_depth"] = a.dit.describe_depth()


def row_notes(result: dict) -> list:
    """Per-row lines of a DiT result: the script whose Trainer step ran, the full-depth projection."""
    notes = []
    for r in result["modes"]:
        if r.get("script") and "images_per_sec" in r:
            notes.append(f"{r['mode']}: Trainer.train_step of {r['script']} (task {r['task']})")
        p = r.get("projected_full_depth_images_per_sec_per_device")
        if p:
            notes.append(f"{r['mode']}: full depth (projected, not measured): {p:.2f} images/s per device at the "
                         f"measured {r['tflops_per_device']:.1f} TFLOP/s ({r['full_depth_flops_per_image'] / 1e12:.1f} "
                         f"TFLOP per image vs {r['flops_per_image'] / 1e12:.2f} measured)")
    return notes
