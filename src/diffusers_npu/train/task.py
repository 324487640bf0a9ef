"""What differs between training tasks, behind one small interface.

The :class:`~diffusers_npu.train.loop.Trainer` owns the loop (precision, accumulation, clipping, EMA,
checkpoints, logging, validation, pre-emption). A task says only:

* which models it loads and which of them train (``load_models``, ``trainable_modules``, ``parameters``);
* what a sample is (``build_dataset``), and optionally how it is cached (``cache_spec``);
* how a batch becomes a loss (``compute_loss``);
* what is saved at the end and how a pipeline is built for validation (``save_final``, ``build_pipeline``).

:class:`DiffusionTask` implements the parts every Stable Diffusion task shares (loading components, the noisy
latents / target / Min-SNR loss), so a concrete task is mostly its ``compute_loss`` and what it saves.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class ModelError(ValueError):
    """A missing or broken model folder/component, named."""


SD_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                 "tokenizer": "CLIPTokenizer", "scheduler": "DDPMScheduler"}


def check_model_folder(path: str, components=("unet", "vae", "text_encoder", "tokenizer", "scheduler")) -> None:
    """Fail early and by name when a local model folder is missing or incomplete (hub ids pass through)."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") > 1
    if not looks_local:
        return
    if not os.path.isdir(path):
        raise ModelError(f"--pretrained_model_name_or_path: {path} does not exist (expected a diffusers "
                         f"pipeline folder with model_index.json)")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelError(f"--pretrained_model_name_or_path: {path} has no model_index.json (expected a "
                         f"diffusers pipeline folder)")
    for c in components:
        if not os.path.isdir(os.path.join(path, c)):
            raise ModelError(f"--pretrained_model_name_or_path: {path} has no '{c}' folder "
                             f"(component {SD_COMPONENTS.get(c, c)} is needed)")


def load_component(kind: str, path: str, revision=None, variant=None, subfolder=None):
    import diffusers
    import transformers

    sub = subfolder or kind
    try:
        if kind == "tokenizer":
            return transformers.CLIPTokenizer.from_pretrained(path, subfolder=sub, revision=revision)
        if kind == "text_encoder":
            return transformers.CLIPTextModel.from_pretrained(path, subfolder=sub, revision=revision,
                                                              variant=variant)
        if kind == "scheduler":
            return diffusers.DDPMScheduler.from_pretrained(path, subfolder=sub, revision=revision)
        cls = getattr(diffusers, SD_COMPONENTS[kind])
        return cls.from_pretrained(path, subfolder=sub, revision=revision, variant=variant)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"--pretrained_model_name_or_path: cannot load {kind} ({SD_COMPONENTS.get(kind, kind)}) "
                         f"from {path}/{sub}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


class Task:
    name = "task"
    #: cache support: tasks whose samples are (image, caption) can train on cached latents
    supports_cache = False

    def __init__(self, args):
        self.args = args

    @staticmethod
    def add_arguments(parser) -> None:
        pass

    def validate_args(self) -> None:
        pass

    def load_models(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def trainable_modules(self) -> dict:
        raise NotImplementedError

    def parameters(self):
        return [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]

    def build_dataset(self):
        raise NotImplementedError

    def compute_loss(self, batch: dict, generator=None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        pass

    def build_pipeline(self, device, weight_dtype):
        raise NotImplementedError

    def validation_kwargs(self, index: int, prompt: str) -> dict:
        """Extra pipeline arguments for validation prompt ``index`` (e.g. a ControlNet's conditioning image)."""
        return {}

    def save_final(self, folder: str, pipeline) -> None:
        raise NotImplementedError

    def summary_extra(self) -> dict:
        return {}


class DiffusionTask(Task):
    """Shared Stable Diffusion plumbing: components, noising, targets and the (Min-SNR) loss."""

    supports_cache = True
    pipeline_class_name = "StableDiffusionPipeline"

    def load_models(self, device, weight_dtype):
        a = self.args
        path = a.pretrained_model_name_or_path
        check_model_folder(path)
        self.tokenizer = load_component("tokenizer", path, a.revision)
        self.noise_scheduler = load_component("scheduler", path, a.revision)
        self.text_encoder = load_component("text_encoder", path, a.revision, a.variant)
        self.vae = load_component("vae", path, a.revision, a.variant)
        self.unet = load_component("unet", path, a.revision, a.variant)
        if a.prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=a.prediction_type)
        self.device, self.weight_dtype = device, weight_dtype
        # Frozen encoders run in the autocast dtype (halves their memory and time); trainable weights stay fp32
        # (master weights) and are autocast in the step.
        for m in (self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        self.vae.to(device, dtype=weight_dtype)
        self.text_encoder.to(device, dtype=weight_dtype)
        self.unet.to(device)

    # -------------------------------------------------------------------------------------- shared loss pieces
    def encode_images(self, pixel_values):
        """VAE latents, sampled from the posterior, scaled as SD expects."""
        dist = self.vae.encode(pixel_values.to(self.device, self.weight_dtype)).latent_dist
        return dist.sample() * self.vae.config.scaling_factor

    def _per_sample_generators(self, batch):
        """With --per_sample_noise: one CPU generator per sample, seeded by (seed, epoch, index), so a sample's
        noise, timestep and latent draw do not depend on batch composition, accumulation or world size."""
        if not getattr(self.args, "per_sample_noise", False) or "epoch" not in batch:
            return None
        from ..data.dataset import sample_rng

        return [torch.Generator().manual_seed(sample_rng(self.args.seed, int(e), int(i), "noise").getrandbits(63))
                for e, i in zip(batch["epoch"].tolist(), batch["index"].tolist())]

    def _randn(self, like, gens):
        if gens is None:
            return torch.randn_like(like)
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like.device, like.dtype)

    def latents_from_batch(self, batch, gens=None):
        if "latent_moments" in batch:  # cached: sample from the stored posterior (mean, std)
            mom = batch["latent_moments"].to(self.device, non_blocking=True)
            mean, std = mom.chunk(2, dim=1)
            return (mean + std * self._randn(std, gens)) * self.vae.config.scaling_factor
        with torch.no_grad():
            dist = self.vae.encode(batch["pixel_values"].to(self.device, self.weight_dtype, non_blocking=True)).latent_dist
            if gens is None:
                return dist.sample() * self.vae.config.scaling_factor
            return (dist.mean + dist.std * self._randn(dist.std, gens)) * self.vae.config.scaling_factor

    def text_embeddings(self, batch):
        if "encoder_hidden_states" in batch:
            return batch["encoder_hidden_states"].to(self.device, non_blocking=True)
        with torch.no_grad():
            return self.text_encoder(batch["input_ids"].to(self.device, non_blocking=True))[0]

    def noisy_latents(self, latents, gens=None):
        noise = self._randn(latents, gens)
        if self.args.noise_offset:
            offset = self._randn(latents[:, :, :1, :1], gens)
            noise = noise + self.args.noise_offset * offset
        n_t = self.noise_scheduler.config.num_train_timesteps
        if gens is None:
            t = torch.randint(0, n_t, (latents.shape[0],), device=latents.device).long()
        else:
            t = torch.cat([torch.randint(0, n_t, (1,), generator=g) for g in gens]).to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unknown prediction_type {self.noise_scheduler.config.prediction_type}")
        return noisy, t, target

    def diffusion_loss(self, model_pred, target, timesteps, reduce=True):
        """MSE, optionally Min-SNR-gamma weighted (https://arxiv.org/abs/2303.09556)."""
        if self.args.snr_gamma is None:
            per = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        else:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.noise_scheduler, timesteps)
            w = torch.minimum(snr, torch.full_like(snr, self.args.snr_gamma))
            w = w / snr if self.noise_scheduler.config.prediction_type == "epsilon" else w / (snr + 1)
            per = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * w
        return per.mean() if reduce else per

    # -------------------------------------------------------------------------------------------- pipelines
    def make_sd_pipeline(self, unet, text_encoder=None, tokenizer=None, weight_dtype=torch.float32, **extra):
        import diffusers

        a = self.args
        scheduler = diffusers.DDIMScheduler.from_pretrained(a.pretrained_model_name_or_path, subfolder="scheduler") \
            if _scheduler_is(a.pretrained_model_name_or_path, "DDIMScheduler") else \
            diffusers.PNDMScheduler.from_config(self.noise_scheduler.config)
        cls = getattr(diffusers, self.pipeline_class_name)
        return cls(vae=self.vae, text_encoder=text_encoder or self.text_encoder, tokenizer=tokenizer or self.tokenizer,
                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False, **extra)


def _scheduler_is(path: str, name: str) -> bool:
    import json

    cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    try:
        with open(cfg) as f:
            return json.load(f).get("_class_name") == name
    except OSError:
        return False
