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


# ------------------------------------------------------------------------------------------ flow matching
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def add_flow_matching_arguments(parser, weighting_default: str = "logit_normal", precondition_default: int = 1):
    """Upstream's SD3 / FLUX flags for the flow-matching objective (their names, types and defaults)."""
    from ..cliutil import positive_float

    g = parser.add_argument_group("flow matching (SD3 / FLUX)")
    g.add_argument("--weighting_scheme", default=weighting_default, choices=WEIGHTING_SCHEMES,
                   help="how training timesteps are drawn and the loss weighted: logit_normal / mode change the "
                        "timestep density; sigma_sqrt / cosmap weight the loss by sigma; none = uniform timesteps, "
                        "unweighted loss")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of the 'logit_normal' timestep density")
    g.add_argument("--logit_std", type=positive_float, default=1.0, help="std of the 'logit_normal' timestep density")
    g.add_argument("--mode_scale", type=float, default=1.29,
                   help="scale of the 'mode' timestep density (only read with --weighting_scheme mode)")
    g.add_argument("--precondition_outputs", type=int, default=precondition_default, choices=[0, 1],
                   help="1: precondition the model output as in EDM (x0 = noisy - sigma * output, target the clean "
                        "latents); 0: target the velocity noise - latents")


class FlowSample:
    """What one flow-matching draw made for a batch: the noisy input and everything the loss needs."""

    __slots__ = ("latents", "noise", "sigmas", "timesteps", "noisy")

    def __init__(self, latents, noise, sigmas, timesteps, noisy):
        self.latents, self.noise, self.sigmas, self.timesteps, self.noisy = latents, noise, sigmas, timesteps, noisy


class FlowMatchingObjective(Objective):
    """Rectified-flow objective of the SD3 / FLUX models (upstream's train_dreambooth_sd3.py and relatives).

    Timesteps: ``u`` from diffusers' ``compute_density_for_timestep_sampling`` (``--weighting_scheme``
    logit_normal / mode, else uniform), index ``floor(u * N)`` into the training sigmas of the model's own
    ``FlowMatchEulerDiscreteScheduler`` config (its ``shift`` already applied), timestep ``sigma * N``. Where
    the config asks for resolution-dependent shifting (``use_dynamic_shifting``, FLUX.1-dev) the sigma is shifted
    for the image's token count as the scheduler shifts it at inference (``calculate_shift`` + ``time_shift``).
    Noisy input ``(1 - sigma) x + sigma n``; target ``n - x``, or with ``--precondition_outputs`` the clean
    latents from ``noisy - sigma * prediction``; per-sample loss ``mean(w(sigma) (pred - target)^2)`` with
    diffusers' ``compute_loss_weighting_for_sd3``, or unweighted (``weight_loss=False``: upstream's FLUX
    ControlNet script weights only the timestep density).
    """

    def __init__(self, noise_scheduler, seed: int = 0, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 precondition_outputs: bool = True, per_sample_noise: bool = False, weight_loss: bool = True):
        import diffusers

        super().__init__(noise_scheduler, seed=seed, per_sample_noise=per_sample_noise)
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting scheme {weighting_scheme!r}")
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = bool(precondition_outputs)
        self.weight_loss = bool(weight_loss)
        # A fresh scheduler from the config: the pipeline's copy changes its sigmas when it samples.
        train = diffusers.FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
        self.config = train.config
        self.train_scheduler = train
        self.sigmas = train.sigmas.clone().float()  # [N], from sigma_max down to 1/N (shifted)
        self.num_train_timesteps = int(train.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return "flow_matching"

    def density(self, n: int, gens=None) -> torch.Tensor:
        """``u`` in [0, 1] per sample from diffusers' timestep density (one draw per generator)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        kw = dict(weighting_scheme=self.weighting_scheme, logit_mean=self.logit_mean, logit_std=self.logit_std,
                  mode_scale=self.mode_scale)
        if gens is None:
            return compute_density_for_timestep_sampling(batch_size=n, **kw)
        return torch.cat([compute_density_for_timestep_sampling(batch_size=1, generator=g, **kw) for g in gens])

    def shift_mu(self, image_seq_len: Optional[int]) -> Optional[float]:
        """``mu`` of the resolution-dependent shift for ``image_seq_len`` tokens, or None when the config has no
        dynamic shifting."""
        c = self.config
        if not c.use_dynamic_shifting or image_seq_len is None:
            return None
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return float(image_seq_len * m + c.base_shift - m * c.base_image_seq_len)

    def sigmas_for(self, u: torch.Tensor, image_seq_len: Optional[int] = None) -> torch.Tensor:
        """The training sigma of each ``u`` (float32, on ``u``'s device)."""
        # u == 1.0 exactly (float32 sigmoid of a large logit) would index past the end upstream; clamp.
        idx = (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)
        sigma = self.sigmas.to(u.device)[idx]
        mu = self.shift_mu(image_seq_len)
        if mu is not None:
            sigma = self.train_scheduler.time_shift(mu, 1.0, sigma).float()
        return sigma

    def sample(self, latents: torch.Tensor, gens=None, image_seq_len: Optional[int] = None) -> FlowSample:
        """Noise, sigma and the noisy input for a batch of clean (scaled and shifted) latents."""
        noise = self.randn(latents, gens)
        u = self.density(latents.shape[0], gens).to(latents.device)
        sigma = self.sigmas_for(u, image_seq_len)
        s = sigma.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        noisy = (1.0 - s) * latents + s * noise
        return FlowSample(latents, noise, sigma, sigma * self.num_train_timesteps, noisy)

    def weighting(self, sigmas: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if not self.weight_loss:
            return torch.ones_like(sigmas, dtype=torch.float32)
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas.float())

    def flow_loss(self, pred: torch.Tensor, sample: FlowSample, reduce: bool = True):
        """Per-sample weighted MSE in fp32 (its batch mean when ``reduce``). ``pred`` has the latents' layout
        (unpack FLUX's tokens first)."""
        pred = pred.float()
        shape = (-1,) + (1,) * (pred.dim() - 1)
        sigma = sample.sigmas.float().view(shape)
        if self.precondition_outputs:
            pred = pred * (-sigma) + sample.noisy.float()
            target = sample.latents.float()
        else:
            target = sample.noise.float() - sample.latents.float()
        w = self.weighting(sample.sigmas).view(shape)
        per = (w * (pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
        return per.mean() if reduce else per
