"""ControlNet: a trainable copy of the UNet encoder steers the frozen UNet with a conditioning image.

``ControlNetModel.from_unet`` copies the UNet's encoder; its output convolutions start at zero, so before
training the UNet's output is exactly unchanged. Only the ControlNet trains. Its conditioning embedding
downsamples the conditioning image to the latent size by the VAE's factor: the default (16, 32, 96, 256)
divides by 8 (Stable Diffusion's VAE); the embedded 16 px model's VAE has f=2, so (16, 32) is used. The
final output (``--output_dir``) is a ControlNet folder: ``ControlNetModel.from_pretrained(output_dir)``,
usable in ``StableDiffusionControlNetPipeline``.

Data is the text-to-image data path (same sources, crops, flips, bad-image handling): the conditioning image
comes from ``--conditioning_image_column`` (or a column named ``conditioning_image``) and gets exactly the
image's crop and flip; without one (the embedded digits) it is derived from the image itself, its Sobel edge
magnitude (``--derived_conditioning sobel``) or a blur (``blur``).
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional

from ...errors import DataError, ModelError, UsageError
from .. import weights
from ..registry import LaunchProfile, register_task
from ..sd import DiffusionTask, Frozen, SDModule, cast_frozen, load_unet_like, save_unet_like

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


class ControlNetModule(SDModule):
    """The ControlNet is registered (trained); the UNet is frozen and only referred to."""

    def forward(self, batch):
        gens = self.objective.generators(batch)
        latents = self.latents(batch, gens)
        states = self.text_states(batch)
        noisy, t, target = self.objective.noisy(latents, gens)
        cond = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        dtype = self.weight_dtype
        pred = self.frozen.unet(noisy, t, states, down_block_additional_residuals=[r.to(dtype) for r in down],
                                mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
        return self.objective.loss(pred, target, t), {}


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
    defaults = {"learning_rate": 5e-6, "train_batch_size": 4, "num_train_epochs": 1, "output_dir": "controlnet-model",
                "validation_steps": 100, "tracker_project_name": "train_controlnet"}
    supports_ema = False
    ema_refusal = "EMA averages UNet weights and the UNet stays frozen here"
    output_kind = "controlnet"
    pipeline_class_name = "StableDiffusionControlNetPipeline"

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("ControlNet")
        g.add_argument("--controlnet_model_name_or_path", default=None, metavar="FOLDER",
                       help="start from this ControlNet instead of a zero-initialised copy of the UNet encoder")
        g.add_argument("--conditioning_image_column", default=None,
                       help="column of conditioning images; default 'conditioning_image' when present, else the "
                            "conditioning is derived from the image (--derived_conditioning)")
        g.add_argument("--derived_conditioning", default="sobel", choices=["sobel", "blur"],
                       help="conditioning made from the image when the data set has none")
        g.add_argument("--validation_image", nargs="+", default=None,
                       help="conditioning image(s) for the validation prompts (one, or one per prompt; a single "
                            "prompt goes with each image, as upstream); default: the conditioning of the first "
                            "training samples")

    def validate_args(self):
        a = self.args
        if a.validation_image and a.validation_prompts and len(a.validation_prompts) == 1:
            a.validation_prompts = a.validation_prompts * len(a.validation_image)  # upstream: one prompt for all
        if a.validation_image and a.validation_prompts and len(a.validation_image) not in (1, len(a.validation_prompts)):
            raise UsageError(f"--validation_image: give 1 or {len(a.validation_prompts)} images (one per validation "
                             f"prompt), got {len(a.validation_image)}")

    # ------------------------------------------------------------------------------------------ models
    def make_controlnet(self, sdxl: bool = False) -> None:
        """``self.controlnet`` from --controlnet_model_name_or_path (checked against the VAE's factor and, for
        SDXL, its text_time embedding) or as a zero-initialised copy of the fp32 UNet; then the UNet is frozen
        in the autocast dtype."""
        from diffusers import ControlNetModel

        a, rt = self.args, self.rt
        factor = self.vae_scale_factor()
        flag = "--controlnet_model_name_or_path"
        if a.controlnet_model_name_or_path:
            try:
                self.controlnet = ControlNetModel.from_pretrained(a.controlnet_model_name_or_path)
            except Exception as e:
                raise ModelError(f"{flag}: cannot load a ControlNet from {a.controlnet_model_name_or_path}: "
                                 f"{type(e).__name__}: {e}") from None
            if sdxl and self.controlnet.config.addition_embed_type != "text_time":
                raise ModelError(f"{flag}: {a.controlnet_model_name_or_path} is not an SDXL ControlNet (no text_time "
                                 f"embedding)")
            have = len(self.controlnet.config.conditioning_embedding_out_channels) - 1
            if 2 ** have != factor:
                raise ModelError(f"{flag}: its conditioning embedding downsamples by {2 ** have} but the VAE by "
                                 f"{factor}")
        else:  # copied from the fp32 UNet, before the UNet drops to the autocast dtype below
            self.controlnet = ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=embedding_channels_for(factor))
        self.controlnet.to(rt.device)  # fp32 master weights, autocast in the step
        self.controlnet.train()
        self.unet.requires_grad_(False)
        cast_frozen(self.unet, rt.weight_dtype)  # frozen (never wrapped by the engine): the autocast dtype

    def build_module(self):
        self.load_components()
        self.make_controlnet()
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder, unet=self.unet)
        return ControlNetModule(frozen, self.objective(), self.rt.weight_dtype, controlnet=self.controlnet)

    def attention_models(self):
        return [self.unet, self.vae, self.controlnet]

    def checkpointing_models(self):
        return [self.controlnet]

    def compile_models(self):
        return [self.unet, self.controlnet]

    # -------------------------------------------------------------------------------------------- data
    def build_dataset(self):
        a = self.args
        columns = self.load_rows().ds.column_names
        column = a.conditioning_image_column
        if column is None and "conditioning_image" in columns:
            column = "conditioning_image"
        if column is not None and column not in columns:
            raise DataError(f"--conditioning_image_column: no column {column!r}; the data set has columns: "
                            f"{', '.join(columns)}")
        self.conditioning_source = column or f"derived ({a.derived_conditioning})"
        logger.info("ControlNet conditioning: %s", self.conditioning_source)
        if column is not None:
            self.dataset = self.image_caption_dataset(paired_columns={"conditioning_pixel_values": column})
        else:
            self.dataset = self.image_caption_dataset(derived={"conditioning_pixel_values": a.derived_conditioning})
        return self.dataset

    # ------------------------------------------------------------------------------------------ outputs
    def pipeline(self):
        self.unet.to(self.rt.device)
        return self.sd_pipeline(controlnet=self.controlnet)

    def validation_kwargs(self, index, prompt):
        from PIL import Image

        from ...data.images import load_pil

        a = self.args
        if a.validation_image:
            path = a.validation_image[index if len(a.validation_image) > 1 else 0]
            img = load_pil(path, f"--validation_image {path}").resize((a.resolution, a.resolution), Image.BILINEAR)
        else:
            cond = self.dataset[(0, index % len(self.dataset))]["conditioning_pixel_values"]
            img = Image.fromarray((cond.float().permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        return {"image": img}

    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        return save_unet_like(self.controlnet, folder, self.rt, name="controlnet")

    def load_trained(self, folder: str) -> Optional[dict]:
        load_unet_like(self.controlnet, folder, name="controlnet")
        return None

    def save_final(self, folder: str) -> List[str]:
        weights.save_model(self.controlnet, folder, self.rt.is_main, self.args.save_consolidated)
        if not self.rt.is_main:
            return []
        files = sorted(os.listdir(folder))
        self.training_info(folder, "controlnet", files, load_with="ControlNetModel.from_pretrained(this_folder)")
        return files

    def summary_extra(self):
        return {"conditioning": getattr(self, "conditioning_source", None),
                "conditioning_embedding_out_channels":
                    list(self.controlnet.config.conditioning_embedding_out_channels)
                    if getattr(self, "controlnet", None) is not None else None}
