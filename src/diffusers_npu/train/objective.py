"""The denoising objective every Stable Diffusion task trains: noise, timesteps, targets and the loss.

``--noise_offset`` (and DreamBooth's ``--offset_noise``), ``--input_perturbation``, ``--snr_gamma`` (Min-SNR-γ
weighting, https://arxiv.org/abs/2303.09556), epsilon or v-prediction targets, and ``--per_sample_noise``
(each sample's noise and timestep drawn from a generator seeded by (seed, epoch, index), so results do not
depend on how a global batch is split over processes or accumulation steps).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


class Objective:
    """Holds the noise scheduler and the loss options. Not an ``nn.Module``: it has no weights."""

    def __init__(self, noise_scheduler, seed: int = 0, snr_gamma: Optional[float] = None,
                 noise_offset: float = 0.0, input_perturbation: float = 0.0, per_sample_noise: bool = False):
        self.scheduler = noise_scheduler
        self.seed = seed
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.input_perturbation = input_perturbation
        self.per_sample_noise = per_sample_noise

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    # ------------------------------------------------------------------------------------ randomness
    def generators(self, batch, salt: str = "noise") -> Optional[List[torch.Generator]]:
        """One CPU generator per sample with --per_sample_noise, else None (the global RNG is used)."""
        if not self.per_sample_noise or "epoch" not in batch:
            return None
        from ..data.dataset import sample_rng

        return [torch.Generator().manual_seed(sample_rng(self.seed, int(e), int(i), salt).getrandbits(63))
                for e, i in zip(batch["epoch"].tolist(), batch["index"].tolist())]

    @staticmethod
    def randn(like: torch.Tensor, gens=None) -> torch.Tensor:
        if gens is None:
            return torch.randn_like(like)
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like.device, like.dtype)

    def timesteps(self, n: int, device, gens=None) -> torch.Tensor:
        n_t = self.scheduler.config.num_train_timesteps
        if gens is None:
            return torch.randint(0, n_t, (n,), device=device).long()
        return torch.cat([torch.randint(0, n_t, (1,), generator=g) for g in gens]).to(device)

    # ------------------------------------------------------------------------------------ objective
    def noisy(self, latents: torch.Tensor, gens=None):
        """(noisy latents, timesteps, target) for a batch of clean latents."""
        noise = self.randn(latents, gens)
        if self.noise_offset:
            # https://www.crosslabs.org//blog/diffusion-with-offset-noise: one offset per sample and channel
            noise = noise + self.noise_offset * self.randn(latents[:, :, :1, :1], gens)
        t = self.timesteps(latents.shape[0], latents.device, gens)
        # Input perturbation noises the input with a slightly different noise than the target's.
        noised_with = noise + self.input_perturbation * self.randn(latents, gens) if self.input_perturbation else noise
        noisy = self.scheduler.add_noise(latents, noised_with, t)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        return noisy, t, target

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights: min(SNR, γ) / SNR for epsilon, min(SNR, γ) / (SNR + 1) for v-prediction."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        w = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
        return w / snr if self.prediction_type == "epsilon" else w / (snr + 1)

    def prior_generators(self, batch, prior: bool):
        """Per-sample generators for instance samples followed, with prior preservation, by their class
        samples, which draw from their own streams."""
        gens = self.generators(batch)
        if gens is not None and prior:
            gens = gens + [torch.Generator().manual_seed(g.initial_seed() ^ 0x5DEECE66D) for g in gens]
        return gens

    @staticmethod
    def prior_preservation(per_sample: torch.Tensor, n_instance: int, weight: float):
        """DreamBooth's loss from per-sample losses of instance samples then class samples:
        ``instance + weight * prior``, with both parts as metrics."""
        instance = per_sample[:n_instance].mean()
        if per_sample.shape[0] == n_instance:
            return instance, {"instance_loss": instance.detach()}
        prior = per_sample[n_instance:].mean()
        return instance + weight * prior, {"instance_loss": instance.detach(), "prior_loss": prior.detach()}

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, reduce: bool = True):
        """MSE in fp32, per sample, optionally Min-SNR weighted; the mean over the batch when ``reduce``."""
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
        if self.snr_gamma is not None:
            per = per * self.snr_weights(timesteps)
        return per.mean() if reduce else per
