"""Training throughput harness: the upstream example's step versus our fast modes, measured in one run.

Modes (all train the same randomly initialised architecture of ``--preset`` from the same weights, on the same
synthetic in-memory data set of random images and captions):

``reference``
    A faithful re-implementation of the step of diffusers' ``examples/text_to_image/train_text_to_image.py``:
    a DataLoader (shuffle, ``--dataloader_num_workers`` 0 as upstream's default) over the images with the
    torchvision transforms upstream uses, the VAE (weights in the fp16 ``weight_dtype``) and the text encoder
    inside the step, the UNet under fp16 autocast with a GradScaler (as accelerate's ``mixed_precision=fp16``
    does), diffusers' stock attention processor, ``torch.optim.AdamW`` with its defaults (no foreach/fused
    flags), gradient clipping at upstream's default ``--max_grad_norm 1.0``, a constant LR schedule, and
    ``loss.item()`` every step. On CPU fp16 autocast is not used (slow or unsupported kernels): fp32.
``online``
    Encoders still in the step, with our defaults: ``set_attention(unet, "auto")``, the fused (CUDA/NPU) or
    foreach (CPU) AdamW from :func:`diffusers_npu.optim.build_optimizer`, channels_last except on CPU, bf16
    autocast where the device has it, no host synchronisation in the step (losses stay on the device and are
    read every ``--log_every`` steps), pinned memory and persistent DataLoader workers. The data set, sampler,
    collate function and the loss are the training library's own (:class:`ImageCaptionDataset`,
    :class:`ResumableSampler`, ``TextToImageTask.compute_loss``).
``cached``
    As ``online``, but from a latent cache built once with the library's :class:`LatentCache` (VAE posterior
    mean+std of both orientations when flipping, text-encoder states), read through :class:`CachedDataset`.
    The encoders are not on the device while training. The one-off encoding time is reported separately.
``compiled``
    ``cached`` plus ``torch.compile`` of the UNet's forward (as ``--compile`` does); the warm-up seconds
    (compilation included) are reported separately from the steady-state figures.

FLOPs: matmul/conv/attention FLOPs of one UNet forward+backward, one VAE-encoder forward and one text-encoder
forward are counted once at batch 1 with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no
compute, identical on every device) and scaled by the batch. A mode's TFLOP/s counts what that mode executes:
UNet + encoders for ``reference``/``online``, UNet only for ``cached``/``compiled``.

Timing: after ``--warmup`` steps the device is synchronised, ``--steps`` steps run, the last losses are read
and the device is synchronised again. images/s = batch x steps / that wall time (data loading included).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import shutil
import sys
import tempfile
import time

import torch

from . import common

MODES = ("reference", "online", "cached", "compiled")
PRESET_CHOICES = ("tiny", "digits", "sd15", "sd21-base", "sd21")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_throughput.py",
        description="Training images/s of the upstream diffusers example step (reference) versus the "
                    "diffusers-npu fast modes, on a randomly initialised preset architecture (no downloads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="sd21-base", choices=PRESET_CHOICES, help="architecture (random weights)")
    p.add_argument("--resolution", type=int, default=None, help="image side; default: the preset's (512 for "
                                                                "sd21-base, 32 for tiny)")
    p.add_argument("--batch_size", type=int, default=None, help="per-step batch; default 24 on GPU/NPU, 8 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode; default 20 (GPU/NPU), 10 (CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 5 (GPU/NPU), 2 (CPU)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated subset of {','.join(MODES)}; default all (on CPU 'compiled' is "
                        f"skipped unless named: inductor's C++ compile of the UNet takes many minutes there)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for the precision used (e.g. 989 for H100/H200 SXM dense "
                        "bf16/fp16) to report %% of peak")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "npu", "cpu"])
    p.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="our modes' autocast precision; auto = bf16 where the device supports it (CUDA/NPU), "
                        "else no (fp32), as the trainer's default")
    p.add_argument("--reference_precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="the reference's precision; auto = fp16 + GradScaler on CUDA/NPU (the upstream "
                        "command), fp32 on CPU")
    p.add_argument("--num_samples", type=int, default=None, help="synthetic data set size; default 4 x batch")
    p.add_argument("--dataloader_num_workers", type=int, default=None,
                   help="our modes' DataLoader workers; default 4 on GPU/NPU, 0 on CPU (the reference always "
                        "uses upstream's default, 0)")
    p.add_argument("--log_every", type=int, default=10, help="our modes read the losses every N steps")
    p.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="gradient clipping in every mode (upstream's default 1.0; 0 = off)")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--random_flip", default=True, action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (the cache then holds both orientations)")
    p.add_argument("--compile_mode", default=None,
                   help="torch.compile mode for 'compiled' (default: torch's default mode)")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for 'compiled' ('eager' only traces: for smoke tests)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default 1 on CPU (multi-threaded kernels on small tensors are slower "
                        "and erratic on a shared machine), torch's choice elsewhere")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------------------------------- data
class InMemoryRows:
    """Rows ``{"image": PIL image, "text": caption}`` with the parts of ``datasets.Dataset`` the library's
    data set and latent cache use (``len``, ``ds[i]``, ``ds[a:b]`` -> columns, ``select_columns``)."""

    def __init__(self, images, captions):
        self.images, self.captions = images, captions
        self._fingerprint = f"bench-synthetic-{len(images)}-{id(self)}"

    def __len__(self):
        return len(self.images)

    def select_columns(self, columns):
        return self

    def __getitem__(self, key):
        if isinstance(key, slice):
            return {"image": self.images[key], "text": self.captions[key]}
        return {"image": self.images[key], "text": self.captions[key]}


def synthetic_rows(n: int, resolution: int, seed: int) -> InMemoryRows:
    """``n`` random RGB images 1.25x the training side (so the resize does real work) with random captions."""
    import numpy as np
    from PIL import Image

    from ..presets import EMBEDDED_WORDS

    rng = np.random.default_rng(seed)
    side = max(8, int(round(resolution * 1.25 / 8)) * 8)
    images, captions = [], []
    for _ in range(n):
        # Smooth-ish content: low-resolution noise upscaled, plus fine noise.
        low = rng.integers(0, 256, (max(2, side // 16), max(2, side // 16), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((side, side), Image.BILINEAR), dtype=np.int16)
        img = np.clip(img + rng.integers(-16, 17, img.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(img))
        words = rng.choice(len(EMBEDDED_WORDS), size=int(rng.integers(3, 8)))
        captions.append(" ".join(EMBEDDED_WORDS[w] for w in words))
    return InMemoryRows(images, captions)


class ReferenceDataset(torch.utils.data.Dataset):
    """Upstream's preprocessing: torchvision Resize / CenterCrop / RandomHorizontalFlip / ToTensor / Normalize
    and per-example tokenisation (``with_transform`` runs per access)."""

    def __init__(self, rows: InMemoryRows, tokenizer, resolution: int, center_crop=True, random_flip=True):
        from torchvision import transforms

        self.rows, self.tokenizer = rows, tokenizer
        self.transforms = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
            transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        ids = self.tokenizer([row["text"]], max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": self.transforms(row["image"].convert("RGB")), "input_ids": ids}


def reference_collate(examples):
    pixel_values = torch.stack([e["pixel_values"] for e in examples])
    pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
    return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}


def _epochs(loader):
    while True:  # upstream iterates epoch after epoch; a new iterator per epoch
        yield from loader


# ------------------------------------------------------------------------------------------------ context
class Bench:
    """Everything the modes share: the pristine (CPU, fp32) components, data, FLOP counts, settings."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.tmp = tempfile.mkdtemp(prefix="dnpu-bench-")
        self._cache = None
        self.cache_build_s = None

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- precision
    @staticmethod
    def _dtype(name):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)

    def autocast(self, amp_dtype):
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=amp_dtype)

    # -- models
    def fresh_unet(self):
        return copy.deepcopy(self.components["unet"]).to(self.device)

    def fresh_encoders(self, dtype):
        vae = copy.deepcopy(self.components["vae"]).to(self.device, dtype=dtype)
        te = copy.deepcopy(self.components["text_encoder"]).to(self.device, dtype=dtype)
        for m in (vae, te):
            m.requires_grad_(False)
            m.eval()
        return vae, te

    def make_task(self, unet, vae, text_encoder, weight_dtype):
        """A ``TextToImageTask`` holding these modules: its ``compute_loss`` is the trainer's own loss."""
        from ..train import build_parser as train_parser
        from ..train.tasks.text_to_image import TextToImageTask

        targs = train_parser(TextToImageTask).parse_args([])  # every flag at its default
        targs.seed = self.args.seed
        targs.resolution = self.args.resolution
        task = TextToImageTask(targs)
        task.unet, task.vae, task.text_encoder = unet, vae, text_encoder
        task.tokenizer = self.components["tokenizer"]
        task.noise_scheduler = self.components["noise_scheduler"]
        task.device, task.weight_dtype = torch.device(self.device), weight_dtype
        return task

    # -- latent cache (shared by 'cached' and 'compiled')
    def latent_cache(self, weight_dtype):
        if self._cache is None:
            from ..data.cache import LatentCache

            a = self.args
            vae, te = self.fresh_encoders(weight_dtype)
            common.sync(self.device)
            t0 = time.perf_counter()
            # As the trainer's --cache_latents: encoders in the weight dtype, no autocast.
            self._cache = LatentCache.build(
                folder=os.path.join(self.tmp, "latent-cache"), parts={"bench": True}, hf_dataset=self.rows,
                image_column="image", caption_column="text", resolution=a.resolution,
                random_flip=a.random_flip, vae=vae, text_encoder=te, tokenizer=self.components["tokenizer"],
                device=torch.device(self.device), dtype=weight_dtype, progress=False)
            common.sync(self.device)
            self.cache_build_s = time.perf_counter() - t0
            del vae, te  # the encoders leave the device
            common.reset_memory(self.device)
        return self._cache


# ----------------------------------------------------------------------------------------------- the modes
def run_reference(b: Bench) -> dict:
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler

    from ..attention import set_attention

    a, device = b.args, b.device
    amp = b._dtype(a.reference_precision_resolved)
    weight_dtype = amp or torch.float32
    unet = b.fresh_unet()
    set_attention(unet, "default")  # diffusers' stock processor
    unet.train()
    vae, text_encoder = b.fresh_encoders(weight_dtype)
    sched = b.components["noise_scheduler"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=a.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=a.warmup + a.steps)
    scaler = torch.amp.GradScaler(device) if a.reference_precision_resolved == "fp16" else None
    loader = torch.utils.data.DataLoader(
        ReferenceDataset(b.rows, b.components["tokenizer"], a.resolution, center_crop=True,
                         random_flip=a.random_flip),
        shuffle=True, collate_fn=reference_collate, batch_size=a.batch_size, num_workers=0,
        generator=torch.Generator().manual_seed(a.seed))
    batches = _epochs(loader)
    sf = vae.config.scaling_factor
    losses, skipped = [], []

    def step():
        batch = next(batches)
        pixel_values = batch["pixel_values"].to(device)  # accelerate's device placement
        input_ids = batch["input_ids"].to(device)
        latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * sf
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = sched.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise,
                                                                                             timesteps)
        with b.autocast(amp):  # accelerate autocasts the prepared model's forward
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        avg_loss = loss.repeat(a.batch_size).mean()  # accelerator.gather on one process
        losses.append(avg_loss.item())  # upstream: train_loss += avg_loss.item() every step
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if a.max_grad_norm:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), a.max_grad_norm)
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < before:  # overflow: the GradScaler skipped this optimizer step
                skipped.append(len(losses))
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    r = _measure(b, "reference", step, lambda: losses, precision=_precision_label(
        a.reference_precision_resolved, scaler is not None), flops_per_image=b.flops["with_encoders"])
    if scaler is not None:
        r["optimizer_steps_skipped"] = sum(1 for i in skipped if i > a.warmup)  # in the timed window
    return r


def _ours(b: Bench, mode: str) -> dict:
    from diffusers.optimization import get_scheduler

    from ..attention import set_attention
    from ..data.dataset import ImageCaptionDataset, ResumableSampler, collate
    from ..optim import build_optimizer, zero_grad

    a, device = b.args, b.device
    amp = b._dtype(a.mixed_precision_resolved)
    weight_dtype = amp or torch.float32
    cached = mode in ("cached", "compiled")
    accel = device != "cpu"

    if cached:
        from ..data.cache import CachedDataset

        dataset = CachedDataset(b.latent_cache(weight_dtype), a.seed, a.random_flip)
        # As the trainer: the encoders stay off the device (the loss only reads the VAE's scaling factor).
        vae, text_encoder = b.components["vae"], b.components["text_encoder"]
    else:
        dataset = ImageCaptionDataset(b.rows, "image", "text", b.components["tokenizer"], a.resolution,
                                      center_crop=True, random_flip=a.random_flip, seed=a.seed)
    common.reset_memory(device, collect=False)
    if not cached:
        vae, text_encoder = b.fresh_encoders(weight_dtype)
    unet = b.fresh_unet()
    set_attention(unet, "auto")
    if accel:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    if mode == "compiled":
        kw = {"backend": a.compile_backend}
        if a.compile_mode:
            kw["mode"] = a.compile_mode
        unet.forward = torch.compile(unet.forward, **kw)
    task = b.make_task(unet, vae, text_encoder, weight_dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer("fused_adamw" if device in ("cuda", "npu") else "adamw", params,
                                lr=a.learning_rate)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=a.warmup + a.steps)
    scaler = torch.amp.GradScaler(device) if a.mixed_precision_resolved == "fp16" else None
    workers = a.dataloader_num_workers_resolved
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=a.batch_size, sampler=ResumableSampler(len(dataset), a.batch_size, a.seed),
        collate_fn=collate, num_workers=workers, pin_memory=accel, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator())
    batches = iter(loader)
    pending, losses = [], []

    def read_losses():
        if pending:
            losses.extend(torch.stack(pending).tolist())  # the host sync: once every --log_every steps
            pending.clear()
        return losses

    def step():
        batch = next(batches)
        with b.autocast(amp):
            loss, _ = task.compute_loss(batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if a.max_grad_norm:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)  # no .item(): stays on the device
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        zero_grad(optimizer)
        pending.append(loss.detach().float())
        if len(pending) >= a.log_every:
            read_losses()

    flops = b.flops["unet_only"] if cached else b.flops["with_encoders"]
    try:
        return _measure(b, mode, step, read_losses, precision=_precision_label(a.mixed_precision_resolved,
                                                                               scaler is not None),
                        flops_per_image=flops)
    finally:
        del batches, loader  # stop persistent workers


def _precision_label(name: str, scaler: bool) -> str:
    if name in (None, "no"):
        return "fp32"
    return f"{name} autocast" + (" + GradScaler" if scaler else "")


def _measure(b: Bench, mode: str, step, read_losses, precision: str, flops_per_image: int) -> dict:
    a, device = b.args, b.device
    timer = common.StepTimer(device)
    timer.start()
    for _ in range(a.warmup):
        step()
    read_losses()
    warmup_s = timer.stop()
    timer.start()
    for _ in range(a.steps):
        step()
    losses = read_losses()
    wall = timer.stop()
    timed = [v for v in losses[-a.steps:] if math.isfinite(v)]
    images_per_sec = a.batch_size * a.steps / wall
    tflops = flops_per_image * images_per_sec / 1e12
    return {
        "mode": mode,
        "precision": precision,
        "images_per_sec": images_per_sec,
        "ms_per_step": wall / a.steps * 1000.0,
        "tflops": tflops,
        "pct_of_peak": (100.0 * tflops / a.peak_tflops) if a.peak_tflops else None,
        "peak_memory_bytes": common.peak_memory(device),
        "warmup_s": warmup_s,
        "flops_per_image": flops_per_image,
        "mean_loss": sum(timed) / len(timed) if timed else None,
        "nonfinite_losses": a.steps - len(timed),
        "steps": a.steps,
        "warmup_steps": a.warmup,
    }


RUNNERS = {"reference": run_reference, "online": lambda b: _ours(b, "online"),
           "cached": lambda b: _ours(b, "cached"), "compiled": lambda b: _ours(b, "compiled")}


# ------------------------------------------------------------------------------------------------- FLOPs
def count_training_flops(preset, resolution: int, seq_len: int) -> dict:
    """Per-image FLOPs at batch 1, counted on the meta device (no memory, no compute)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..attention import set_attention

    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=seq_len, **preset.text))
    set_attention(unet, "default")
    f = 2 ** (len(preset.vae["block_out_channels"]) - 1)
    lat = resolution // f
    cross = preset.unet["cross_attention_dim"]

    def unet_fwd_bwd():
        x = torch.randn(1, 4, lat, lat, device="meta")
        out = unet(x, torch.tensor([500], device="meta"), torch.randn(1, seq_len, cross, device="meta"),
                   return_dict=False)[0]
        out.float().pow(2).mean().backward()

    def vae_enc():
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, resolution, resolution, device="meta"))

    def text():
        with torch.no_grad():
            te(torch.zeros(1, seq_len, dtype=torch.long, device="meta"))

    unet_f = common.count_flops(unet_fwd_bwd)
    vae_f = common.count_flops(vae_enc)
    te_f = common.count_flops(text)
    return {"unet_fwd_bwd": unet_f, "vae_encoder_fwd": vae_f, "text_encoder_fwd": te_f,
            "with_encoders": unet_f + vae_f + te_f, "unet_only": unet_f}


# --------------------------------------------------------------------------------------------------- main
def resolve_args(args) -> argparse.Namespace:
    from ..device import supports_bf16
    from ..presets import get_preset

    device = common.resolve_device(args.device)
    args.device = device
    accel = device != "cpu"
    preset = get_preset(args.preset)
    if args.resolution is None:
        args.resolution = preset.resolution
    if args.resolution % 8:
        raise SystemExit(f"error: --resolution must be divisible by 8 (got {args.resolution})")
    args.batch_size = args.batch_size or (24 if accel else 8)
    args.steps = args.steps if args.steps is not None else (20 if accel else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if accel else 2)
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 0:
        raise SystemExit("error: --steps and --batch_size must be >= 1, --warmup >= 0")
    args.num_samples = args.num_samples or 4 * args.batch_size
    if args.num_samples < args.batch_size:
        raise SystemExit("error: --num_samples must be >= --batch_size")
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers_resolved = min(4, max(1, (os.cpu_count() or 2) // 2)) if accel else 0
    else:
        args.dataloader_num_workers_resolved = args.dataloader_num_workers
    if args.mixed_precision == "auto":
        args.mixed_precision_resolved = "bf16" if accel and supports_bf16(device) else "no"
    else:
        args.mixed_precision_resolved = args.mixed_precision
    if args.reference_precision == "auto":
        args.reference_precision_resolved = "fp16" if accel else "no"
    else:
        args.reference_precision_resolved = args.reference_precision
    if args.modes is None:
        args.mode_list = list(MODES)
        args.skipped = {} if accel else {
            "compiled": "skipped on CPU by default (inductor's C++ compile of the UNet takes many minutes on a "
                        "small CPU); name it in --modes to run it"}
        args.mode_list = [m for m in args.mode_list if m not in args.skipped]
    else:
        args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in args.mode_list if m not in MODES]
        if unknown or not args.mode_list:
            raise SystemExit(f"error: --modes: unknown {unknown}; choose from {','.join(MODES)}")
        args.skipped = {}
    return args


def main(argv=None) -> dict:
    """Run the benchmark; print the table; return (and with ``--json`` write) the results dict."""
    return common.run_on_device(build_parser().parse_args(argv), lambda a: _main(resolve_args(a)))


def _main(a) -> dict:
    from ..presets import build_components, build_tokenizer, get_preset

    preset = get_preset(a.preset)
    t0 = time.perf_counter()
    b = Bench(a)
    rows = []
    try:
        comps = build_components(a.preset, seed=a.seed, tokenizer_dir=os.path.join(b.tmp, "tokenizer"))
        if comps["tokenizer"] is None:  # large presets: a real CLIP tokenizer over a small vocabulary, 77 ids
            comps["tokenizer"] = build_tokenizer(os.path.join(b.tmp, "tokenizer"),
                                                 max_length=preset.tokenizer_max_length)
        for m in comps["vae"], comps["text_encoder"]:
            m.requires_grad_(False)
        b.components = comps
        b.rows = synthetic_rows(a.num_samples, a.resolution, a.seed)
        b.flops = count_training_flops(preset, a.resolution, preset.tokenizer_max_length)
        b.setup_s = time.perf_counter() - t0
        b.env = common.environment(a.device)
        print(f"train_throughput: preset {a.preset}, {a.resolution} px, batch {a.batch_size}, {a.warmup} warm-up + "
              f"{a.steps} timed steps per mode, device {b.env['device_name']}; reference precision "
              f"{_precision_label(a.reference_precision_resolved, a.reference_precision_resolved == 'fp16')}, "
              f"ours {_precision_label(a.mixed_precision_resolved, a.mixed_precision_resolved == 'fp16')}",
              flush=True)
        for mode in MODES:
            if mode in a.skipped:
                rows.append({"mode": mode, "skipped": a.skipped[mode]})
                continue
            if mode not in a.mode_list:
                continue
            common.reset_memory(a.device, collect=False)  # the previous mode's finally collected
            try:
                r = RUNNERS[mode](b)
                if mode in ("cached", "compiled"):
                    r["cache_build_s"] = b.cache_build_s
                print(f"  {mode}: {r['images_per_sec']:.2f} images/s ({r['ms_per_step']:.1f} ms/step, warm-up "
                      f"{r['warmup_s']:.1f} s)", flush=True)
            except Exception as e:  # one failing mode (OOM, compile error) must not hide the others
                r = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                if common.is_oom(e):
                    r["error"] = "out of memory: " + r["error"]
                print(f"  {mode}: FAILED {r['error']}", file=sys.stderr, flush=True)
            finally:
                common.reset_memory(a.device)
            rows.append(r)
            if a.json:  # results so far, so a run cut short by a time limit still leaves its figures
                common.write_json(a.json, _result(a, b, rows))
    finally:
        b.close()

    result = _result(a, b, rows)
    return common.publish(result, format_results(result), a.json)


def _result(a, b: Bench, rows: list) -> dict:
    ref = next((r for r in rows if r["mode"] == "reference" and "images_per_sec" in r), None)
    for r in rows:
        if "images_per_sec" in r:
            r["vs_reference"] = r["images_per_sec"] / ref["images_per_sec"] if ref else None
    return {
        "benchmark": "train_throughput",
        "config": {"preset": a.preset, "resolution": a.resolution, "batch_size": a.batch_size, "steps": a.steps,
                   "warmup": a.warmup, "num_samples": a.num_samples, "random_flip": a.random_flip,
                   "center_crop": True, "max_grad_norm": a.max_grad_norm, "log_every": a.log_every,
                   "reference_precision": a.reference_precision_resolved,
                   "mixed_precision": a.mixed_precision_resolved,
                   "dataloader_num_workers": {"reference": 0, "ours": a.dataloader_num_workers_resolved},
                   "compile_backend": a.compile_backend, "compile_mode": a.compile_mode,
                   "peak_tflops": a.peak_tflops, "seed": a.seed},
        "flops_per_image": {k: b.flops[k] for k in ("unet_fwd_bwd", "vae_encoder_fwd", "text_encoder_fwd")},
        "flops_counted": "matmul/conv/attention FLOPs at batch 1 on the meta device (FlopCounterMode), x batch",
        "peak_memory_kind": common.memory_kind(a.device),
        "setup_s": b.setup_s,
        "environment": b.env,
        "modes": rows,
    }


HEADERS = ("mode", "precision", "images/s", "ms/step", "TFLOP/s", "% peak", "peak mem", "warm-up s", "vs ref")


def table_rows(result: dict) -> list:
    out = []
    for r in result["modes"]:
        if "images_per_sec" not in r:
            out.append([r["mode"], "skipped" if "skipped" in r else "FAILED"] + ["-"] * 7)
            continue
        warm = common.fmt_num(r["warmup_s"])
        if r.get("cache_build_s") is not None:
            warm += f" (+{common.fmt_num(r['cache_build_s'])} cache)"
        out.append([r["mode"], r["precision"], common.fmt_num(r["images_per_sec"], 2),
                    common.fmt_num(r["ms_per_step"]), common.fmt_num(r["tflops"], 2),
                    common.fmt_num(r["pct_of_peak"]) if r["pct_of_peak"] is not None else "-",
                    common.fmt_bytes(r["peak_memory_bytes"]), warm,
                    f"{r['vs_reference']:.2f}x" if r.get("vs_reference") else "-"])
    return out


def format_results(result: dict, markdown: bool = False) -> str:
    c, fl = result["config"], result["flops_per_image"]
    head = (f"preset {c['preset']} @ {c['resolution']} px, batch {c['batch_size']}, {c['steps']} timed steps "
            f"(+{c['warmup']} warm-up) on {result['environment']['device_name']}; FLOPs/image: UNet fwd+bwd "
            f"{fl['unet_fwd_bwd'] / 1e9:.4g} G, VAE encoder {fl['vae_encoder_fwd'] / 1e9:.4g} G, text encoder "
            f"{fl['text_encoder_fwd'] / 1e9:.4g} G")
    notes = [f"{r['mode']}: {r.get('skipped') or r.get('error')}" for r in result["modes"]
             if "images_per_sec" not in r]
    for r in result["modes"]:
        if r.get("nonfinite_losses"):
            notes.append(f"{r['mode']}: {r['nonfinite_losses']} of the timed steps had a non-finite loss")
        if r.get("optimizer_steps_skipped"):
            notes.append(f"{r['mode']}: the GradScaler skipped {r['optimizer_steps_skipped']} optimizer steps "
                         f"(fp16 overflow) in the timed window")
    notes.append(f"peak mem: {result['peak_memory_kind']}")
    return "\n".join([head, common.format_table(HEADERS, table_rows(result), markdown=markdown)] + notes)


if __name__ == "__main__":
    main()
