"""ControlNet: a trainable copy of the UNet encoder steers the frozen UNet with a conditioning image.

``ControlNetModel.from_unet`` copies the UNet's encoder; its output convolutions start at zero, so before
training the UNet's output is exactly unchanged. Only the ControlNet trains. Its conditioning embedding
downsamples the conditioning image to the latent size by the VAE's factor: the default (16, 32, 96, 256)
divides by 8 (Stable Diffusion's VAE); the embedded 16 px model's VAE has f=2, so (16, 32) is used. The
final output (``--output_dir``) is a ControlNet folder: ``ControlNetModel.from_pretrained(output_dir)``,
usable in ``StableDiffusionControlNetPipeline``.

Conditioning images: ``--conditioning_image_column`` (or a column named ``conditioning_image``), cropped and
flipped like the image; without one (the embedded digits) the conditioning is derived from the image itself:
its Sobel edge magnitude (``--derived_conditioning sobel``) or a blur (``blur``).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ...data import dataset as D
from ...data.sources import DataError, load_source, resolve_columns
from ..registry import LaunchProfile, register_task
from ..task import DiffusionTask, ModelError

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def embedding_channels_for(vae_scale_factor: int) -> tuple:
    """Conditioning-embedding widths whose stride-2 stages divide by ``vae_scale_factor`` (a power of two)."""
    stages = int(round(math.log2(vae_scale_factor)))
    if 2 ** stages != vae_scale_factor:
        raise ModelError(f"the VAE downsamples by {vae_scale_factor}, not a power of two; ControlNet's "
                         f"conditioning embedding cannot match it")
    chans = list(DEFAULT_EMBEDDING_CHANNELS[:stages + 1])
    while len(chans) < stages + 1:
        chans.append(chans[-1] * 2)
    return tuple(chans)


def derive_conditioning(pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """A conditioning image in [0, 1] (3 x H x W) from an image in [-1, 1]: Sobel edges or a blur."""
    gray = ((pixels.mean(dim=0, keepdim=True) + 1) / 2).unsqueeze(0)  # 1 x 1 x H x W
    if kind == "sobel":
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
        gx = F.conv2d(padded, kx.view(1, 1, 3, 3))
        gy = F.conv2d(padded, kx.t().contiguous().view(1, 1, 3, 3))
        out = torch.sqrt(gx ** 2 + gy ** 2)
        peak = out.max()
        out = out / peak if peak > 0 else out
    elif kind == "blur":
        k = max(3, (gray.shape[-1] // 8) | 1)
        out = F.avg_pool2d(gray, k, stride=1, padding=k // 2, count_include_pad=False)
    else:
        raise ValueError(f"unknown derived conditioning {kind!r}")
    return out[0].expand(3, -1, -1).clamp(0, 1).contiguous()


class ConditionedDataset(torch.utils.data.Dataset):
    """Adds ``conditioning_pixel_values`` ([0, 1], same crop/flip as the image) to an ImageCaptionDataset."""

    def __init__(self, base: D.ImageCaptionDataset, column: str | None, derived: str):
        self.base, self.column, self.derived = base, column, derived

    def __len__(self):
        return len(self.base)

    def conditioning(self, epoch: int, index: int, example: dict) -> torch.Tensor:
        b = self.base
        if self.column is None:
            return derive_conditioning(example["pixel_values"], self.derived)
        row = example["index"]  # with --skip_bad_images the example may come from a later row
        img = D.load_pil(b.ds[row][self.column], f"row {row} of {b.name} (column {self.column!r})")
        t = D.image_transform(img, b.resolution, b.center_crop, b.flip_for(epoch, row),
                              D.sample_rng(b.seed, epoch, row, "crop"))
        return (t + 1) / 2

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        ex = self.base[(epoch, index)]
        ex["conditioning_pixel_values"] = self.conditioning(epoch, index, ex)
        return ex


@register_task
class ControlNetTask(DiffusionTask):
    name = "controlnet"
    description = "ControlNet: train a copy of the UNet encoder that steers the frozen UNet with a conditioning image."
    example = "examples/controlnet/train_controlnet.py"
    launch = LaunchProfile(
        network="StableDiffusion_controlnet",
        embedded={"train_batch_size": 16, "max_train_steps": 500, "learning_rate": 1e-4, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "checkpointing_steps": 500},
        pretrained={"resolution": 512, "train_batch_size": 4, "max_train_steps": 5000, "learning_rate": 1e-5,
                    "lr_scheduler": "constant", "lr_warmup_steps": 0, "checkpointing_steps": 500,
                    "dataloader_num_workers": 4})
    supports_cache = False  # the conditioning image is not part of the latent cache
    pipeline_class_name = "StableDiffusionControlNetPipeline"

    @staticmethod
    def add_arguments(parser) -> None:
        g = parser.add_argument_group("ControlNet")
        g.add_argument("--controlnet_model_name_or_path", default=None,
                       help="start from this ControlNet instead of a zero-initialised copy of the UNet")
        g.add_argument("--conditioning_image_column", default=None,
                       help="column of conditioning images; default 'conditioning_image' when present, else "
                            "the conditioning is derived from the image (--derived_conditioning)")
        g.add_argument("--derived_conditioning", default="sobel", choices=["sobel", "blur"],
                       help="conditioning made from the image when the data set has none")
        g.add_argument("--validation_image", nargs="*", default=None,
                       help="conditioning image(s) for --validation_prompts (one, or one per prompt); default: "
                            "the conditioning of the first training samples")

    def validate_args(self):
        from ..args import ConfigError

        a = self.args
        if a.use_ema:
            raise ConfigError("--use_ema averages UNet weights; ControlNet training keeps the UNet frozen")
        if a.validation_image and a.validation_prompts and len(a.validation_image) not in (
                1, len(a.validation_prompts)):
            raise ConfigError(f"--validation_image: give 1 or {len(a.validation_prompts)} images (one per "
                              f"--validation_prompts), got {len(a.validation_image)}")

    # ------------------------------------------------------------------------------------------------ models
    def load_models(self, device, weight_dtype):
        from diffusers import ControlNetModel

        super().load_models(device, weight_dtype)
        a = self.args
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if a.controlnet_model_name_or_path:
            try:
                self.controlnet = ControlNetModel.from_pretrained(a.controlnet_model_name_or_path)
            except Exception as e:
                raise ModelError(f"--controlnet_model_name_or_path: cannot load a ControlNet from "
                                 f"{a.controlnet_model_name_or_path}: {type(e).__name__}: {e}") from e
            have = len(self.controlnet.config.conditioning_embedding_out_channels) - 1
            if 2 ** have != factor:
                raise ModelError(f"--controlnet_model_name_or_path: its conditioning embedding downsamples by "
                                 f"{2 ** have} but the VAE by {factor}")
        else:
            self.controlnet = ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=embedding_channels_for(factor))
        self.controlnet.to(device)  # fp32 master weights, autocast in the step
        self.unet.requires_grad_(False)
        if weight_dtype != torch.float32:  # frozen: run it in the autocast dtype
            self.unet.to(dtype=weight_dtype)
        self.controlnet.requires_grad_(True)

    def trainable_modules(self):
        return {"controlnet": self.controlnet}

    # -------------------------------------------------------------------------------------------------- data
    def build_dataset(self):
        a = self.args
        ds = load_source(a.dataset_name, a.local_data_dir, a.train_data_dir, a.dataset_config_name)
        image_column, caption_column = resolve_columns(ds, a.image_column, a.caption_column)
        column = a.conditioning_image_column
        if column is None and "conditioning_image" in ds.column_names:
            column = "conditioning_image"
        if column is not None and column not in ds.column_names:
            raise DataError(f"--conditioning_image_column: no column {column!r}; the data set has columns: "
                            f"{', '.join(ds.column_names)}")
        if a.max_train_samples is not None:
            ds = ds.select(range(min(a.max_train_samples, len(ds))))
        base = D.ImageCaptionDataset(ds, image_column, caption_column, self.tokenizer, a.resolution,
                                     center_crop=a.center_crop, random_flip=a.random_flip, seed=a.seed,
                                     skip_bad_images=a.skip_bad_images, name="the training data",
                                     proportion_empty_prompts=a.proportion_empty_prompts)
        self.conditioning_source = column or f"derived ({a.derived_conditioning})"
        logger.info("ControlNet conditioning: %s", self.conditioning_source)
        self.dataset = ConditionedDataset(base, column, a.derived_conditioning)
        return self.dataset

    def compute_loss(self, batch, generator=None):
        gens = self._per_sample_generators(batch)  # --per_sample_noise
        latents = self.latents_from_batch(batch, gens)
        states = self.text_embeddings(batch)
        noisy, t, target = self.noisy_latents(latents, gens)
        cond = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=cond,
                                    return_dict=False)
        dtype = self.weight_dtype
        pred = self.unet(noisy, t, states, down_block_additional_residuals=[r.to(dtype) for r in down],
                         mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
        return self.diffusion_loss(pred, target, t), {}

    # ------------------------------------------------------------------------------------------------ output
    def build_pipeline(self, unet):
        return self.make_sd_pipeline(unet, controlnet=self.controlnet)

    def validation_kwargs(self, index, prompt):
        from PIL import Image

        a = self.args
        if a.validation_image:
            path = a.validation_image[index if len(a.validation_image) > 1 else 0]
            img = D.load_pil(path, f"--validation_image {path}").resize((a.resolution, a.resolution),
                                                                         Image.BILINEAR)
        else:
            cond = self.dataset[(0, index % len(self.dataset))]["conditioning_pixel_values"]
            img = Image.fromarray((cond.float().permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        return {"image": img}

    def save_final(self, folder, pipeline):
        pipeline.controlnet.save_pretrained(folder, safe_serialization=True)

    def summary_extra(self):
        return {"conditioning": getattr(self, "conditioning_source", None),
                "conditioning_embedding_out_channels": list(self.controlnet.config.conditioning_embedding_out_channels)}
