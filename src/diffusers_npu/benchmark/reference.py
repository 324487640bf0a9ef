"""``reference``: the step of diffusers' ``examples/text_to_image/train_text_to_image.py``, RE-IMPLEMENTED HERE.

Not the upstream script itself (``--upstream_script PATH`` times that one): a copy of its step, kept because it
runs in-process on any machine without the script. It reads the same model folder and image folder the
Trainer modes train on, the way upstream does: ``from_pretrained`` of each component, ``load_dataset(
"imagefolder", data_files=<dir>/**)`` with ``with_transform`` (torchvision Resize / CenterCrop /
RandomHorizontalFlip / ToTensor / Normalize and per-example tokenisation), a shuffling DataLoader with
upstream's default 0 workers, the VAE and text encoder in the ``weight_dtype`` inside the step, the UNet under
autocast (fp16 with a GradScaler, as accelerate's ``mixed_precision=fp16`` does), diffusers' stock attention,
``torch.optim.AdamW`` with its default kernels, ``clip_grad_norm_`` at upstream's default 1.0, a constant LR
schedule, and ``loss.item()`` every step (upstream's ``train_loss += avg_loss.item()``). On CPU: fp32.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch

from . import common
from .trainer_step import precision_label

LABEL = "upstream step, re-implemented here"


def _loader(model: str, data: str, tokenizer, resolution: int, batch_size: int, seed: int, random_flip: bool):
    from datasets import load_dataset
    from torchvision import transforms

    ds = load_dataset("imagefolder", data_files={"train": os.path.join(data, "**")})["train"]
    tf = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.RandomHorizontalFlip() if random_flip else transforms.Lambda(lambda x: x),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])

    def preprocess(examples):
        examples["pixel_values"] = [tf(im.convert("RGB")) for im in examples["image"]]
        examples["input_ids"] = tokenizer(examples["text"], max_length=tokenizer.model_max_length,
                                          padding="max_length", truncation=True, return_tensors="pt").input_ids
        return examples

    def collate(examples):
        px = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format).float()
        return {"pixel_values": px, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(ds.with_transform(preprocess), shuffle=True, collate_fn=collate,
                                         batch_size=batch_size, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    while True:  # upstream iterates epoch after epoch
        yield from loader


def run_reference(model: str, data: str, device: str, resolution: int, batch_size: int, steps: int, warmup: int,
                  precision: str, seed: int = 0, random_flip: bool = True, max_grad_norm: float = 1.0,
                  learning_rate: float = 1e-4) -> dict:
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..attention import set_attention

    torch.manual_seed(seed)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    weight_dtype = amp or torch.float32
    t0 = time.perf_counter()
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    set_attention(unet, "default")  # diffusers' stock processor
    unet.train()
    unet.to(device)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=warmup + steps)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    batches = _loader(model, data, tokenizer, resolution, batch_size, seed, random_flip)
    setup_s = time.perf_counter() - t0
    sf = vae.config.scaling_factor
    losses, skipped = [], 0

    def step():
        nonlocal skipped
        batch = next(batches)
        pixel_values = batch["pixel_values"].to(device)  # accelerate's device placement
        input_ids = batch["input_ids"].to(device)
        latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample() * sf
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device).long()
        noisy_latents = sched.add_noise(latents, noise, timesteps)
        states = text_encoder(input_ids, return_dict=False)[0]
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        with (torch.autocast(device, dtype=amp) if amp is not None else contextlib.nullcontext()):
            pred = unet(noisy_latents, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        losses.append(loss.repeat(batch_size).mean().item())  # upstream: train_loss += avg_loss.item()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if max_grad_norm:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < before  # overflow: the GradScaler skipped this step
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()

    common.sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    common.sync(device)
    warmup_s = time.perf_counter() - t0
    skipped_before = skipped
    common.reset_memory(device, collect=False)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    common.sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timed = [v for v in losses[-steps:] if math.isfinite(v)]
    return {"label": LABEL, "precision": precision_label(precision, scaler is not None),
            "images_per_sec": batch_size * steps / wall, "images_per_sec_per_device": batch_size * steps / wall,
            "ms_per_step": 1000.0 * wall / steps, "wall_s": wall, "cpu_ms_per_step": 1000.0 * cpu / steps,
            "warmup_s": warmup_s, "setup_s": setup_s,
            "peak_memory_bytes": common.peak_memory(device),
            "mean_loss": sum(timed) / len(timed) if timed else None, "nonfinite_losses": steps - len(timed),
            "fp16_skipped_steps": skipped - skipped_before, "world_size": 1}
