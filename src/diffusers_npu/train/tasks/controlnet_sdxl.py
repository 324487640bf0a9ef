"""ControlNet for Stable Diffusion XL: a trainable copy of the SDXL UNet's encoder steers the frozen UNet with a
conditioning image.

The ControlNet side (zero-initialised ``ControlNetModel.from_unet``, a conditioning embedding that shrinks the
image by the VAE's factor, conditioning from a data set column or derived from the image, the final
``ControlNetModel`` folder, validation images) is :class:`~.controlnet.ControlNetTask`'s; this file adds SDXL's
conditioning: both text encoders, encoder 2's pooled embedding and each sample's time ids, which the
ControlNet receives too. The output loads with ``ControlNetModel.from_pretrained(output_dir)`` and runs in
``StableDiffusionXLControlNetPipeline``.

Upstream's ``--crops_coords_top_left_h/_w`` give one crop corner for every sample's time ids; without them the
real crop of each sample is used.
"""
from __future__ import annotations

import logging

from ...errors import UsageError
from ..registry import LaunchProfile, register_task
from ..sd import Frozen
from ..sdxl import SDXLModule, SDXLTask, add_vae_argument
from .controlnet import ControlNetTask

logger = logging.getLogger(__name__)


class ControlNetSDXLModule(SDXLModule):
    """The ControlNet is registered (trained); the UNet is frozen and only referred to."""

    def forward(self, batch):
        gens = self.objective.generators(batch)
        latents = self.latents(batch, gens)
        embeds, pooled = self.prompt(batch)
        cond = self.added_cond(batch, pooled)
        noisy, t, target = self.objective.noisy(latents, gens)
        image = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=embeds, controlnet_cond=image,
                                    added_cond_kwargs=cond, return_dict=False)
        dtype = self.weight_dtype
        pred = self.frozen.unet(noisy, t, embeds, added_cond_kwargs=cond,
                                down_block_additional_residuals=[r.to(dtype) for r in down],
                                mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
        return self.objective.loss(pred, target, t), {}


@register_task
class ControlNetSDXLTask(SDXLTask, ControlNetTask):
    name = "controlnet_sdxl"
    description = ("ControlNet for Stable Diffusion XL: train a copy of the UNet encoder that steers the frozen "
                   "SDXL UNet with a conditioning image.")
    example = "examples/controlnet/train_controlnet_sdxl.py"
    launch = LaunchProfile(
        network="StableDiffusionXL_controlnet",
        embedded={"train_batch_size": 16, "max_train_steps": 200, "learning_rate": 1e-4, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "checkpointing_steps": 200},
        # Ascend's SDXL suite: batch 5 per device at 1024 px; upstream README's other settings
        pretrained={"resolution": 1024, "train_batch_size": 5, "mixed_precision": "fp16", "max_train_steps": 15000,
                    "learning_rate": 1e-5, "lr_scheduler": "constant", "lr_warmup_steps": 0,
                    "checkpointing_steps": 500, "dataloader_num_workers": 4})
    # upstream's train_controlnet_sdxl.py defaults
    defaults = {"learning_rate": 5e-6, "train_batch_size": 4, "num_train_epochs": 1, "output_dir": "controlnet-model",
                "validation_steps": 100, "tracker_project_name": "sd_xl_train_controlnet"}
    pipeline_class_name = "StableDiffusionXLControlNetPipeline"

    @classmethod
    def add_arguments(cls, parser) -> None:
        ControlNetTask.add_arguments(parser)
        add_vae_argument(parser)
        g = parser.add_argument_group("ControlNet SDXL")
        g.add_argument("--crops_coords_top_left_h", type=int, default=None, metavar="PX",
                       help="crop top used in every sample's time ids (upstream flag); default: each sample's real "
                            "crop")
        g.add_argument("--crops_coords_top_left_w", type=int, default=None, metavar="PX",
                       help="crop left used in every sample's time ids (upstream flag); default: each sample's real "
                            "crop")

    def validate_args(self):
        super().validate_args()
        a = self.args
        for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
            if getattr(a, flag) is not None and getattr(a, flag) < 0:
                raise UsageError(f"--{flag} must be >= 0 (got {getattr(a, flag)})")

    def crop_override(self):
        a = self.args
        if a.crops_coords_top_left_h is None and a.crops_coords_top_left_w is None:
            return None
        return (a.crops_coords_top_left_h or 0, a.crops_coords_top_left_w or 0)

    # ------------------------------------------------------------------------------------------ models
    def build_module(self):
        rt = self.rt
        self.load_components()
        self.make_controlnet(sdxl=True)
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                        unet=self.unet)
        module = ControlNetSDXLModule(frozen, self.objective(), rt.weight_dtype, controlnet=self.controlnet)
        module.crop_override = self.crop_override()
        return module

    # ------------------------------------------------------------------------------------------ outputs
    def pipeline(self):
        self.unet.to(self.rt.device)
        return self.sd_pipeline(controlnet=self.controlnet)
