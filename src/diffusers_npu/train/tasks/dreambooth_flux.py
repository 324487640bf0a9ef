"""DreamBooth for FLUX.1 on the flow-matching objective: upstream's ``train_dreambooth_flux.py`` (full
fine-tuning of the transformer) and ``train_dreambooth_lora_flux.py`` (LoRA in the transformer), on the SD3
DreamBooth task's data, prior preservation, outputs and checkpoints (``dreambooth_sd3.py``), with what FLUX
adds in the step, as upstream computes it:

* **latent packing**: the noisy ``(B, C, H, W)`` latents become ``(B, H/2 * W/2, 4C)`` tokens
  (``FluxPipeline._pack_latents``) and the prediction is unpacked again, so ``--resolution`` must be a
  multiple of twice the VAE's factor (16 for the released VAE);
* **image and text ids**: ``FluxPipeline._prepare_latent_image_ids`` (row, column per token) and zeros for
  the text tokens;
* **guidance embedding** (FLUX.1-dev is guidance-distilled): ``--guidance_scale`` (3.5) for every sample when
  the transformer has ``guidance_embeds``;
* the timestep the transformer takes is sigma (upstream passes ``timesteps / 1000``).
"""
from __future__ import annotations

import torch

from ...errors import UsageError
from ..dit import FLUX
from ..registry import LaunchProfile, register_task
from .dreambooth_sd3 import DreamBoothSD3Module, DreamBoothSD3Task


def flux_call(noisy: torch.Tensor, embeds: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int,
              guidance_embeds: bool, guidance_scale: float) -> dict:
    """The keyword arguments FLUX's transformer (and its ControlNet) take for the ``(B, C, H, W)`` noisy latents:
    the packed tokens, image / text ids, sigma as the timestep and, for guidance-distilled transformers, the
    guidance value of every sample."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    guidance = torch.full((b,), float(guidance_scale), device=noisy.device) if guidance_embeds else None
    return {"hidden_states": flux_pack(noisy),
            "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            "timestep": timesteps / num_train_timesteps, "guidance": guidance, "encoder_hidden_states": embeds}


def flux_pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents as ``(B, H/2 * W/2, 4C)`` tokens (``FluxPipeline._pack_latents``)."""
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, *latents.shape)


def flux_unpack(pred: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The packed prediction back in the ``(B, C, H, W)`` shape of ``like``."""
    from diffusers import FluxPipeline

    # _unpack_latents takes pixel sizes and the VAE factor; with factor 1 the latent sizes are the pixel sizes
    return FluxPipeline._unpack_latents(pred, like.shape[-2], like.shape[-1], 1)


def check_packing(task) -> None:
    """``--resolution`` must divide into FLUX's 2x2 latent tokens (a one-line error before anything is written)."""
    side = 2 * task.vae_scale_factor()
    if task.args.resolution % side:
        raise UsageError(f"--resolution {task.args.resolution}: FLUX packs 2x2 latent patches into one token, so "
                         f"the resolution must be a multiple of {side} (2 x the VAE's factor "
                         f"{task.vae_scale_factor()})")


class DreamBoothFluxModule(DreamBoothSD3Module):
    family = FLUX
    guidance_scale = 3.5

    def denoise(self, sample, embeds, pooled):
        call = flux_call(sample.noisy, embeds, sample.timesteps, self.objective.num_train_timesteps,
                         self.transformer.config.guidance_embeds, self.guidance_scale)
        pred = self.transformer(**call, pooled_projections=pooled, return_dict=False)[0]
        return flux_unpack(pred, sample.noisy)


def _add_flux_arguments(parser, lora_script: bool) -> None:
    from .dreambooth_sd3 import add_dreambooth_sd3_arguments

    add_dreambooth_sd3_arguments(parser, lora_script=lora_script)
    parser.add_argument("--guidance_scale", type=float, default=3.5,
                        help="guidance embedding value of every training sample (FLUX.1-dev is guidance-distilled; "
                             "ignored by transformers without guidance_embeds)")
    # upstream: 77 T5 tokens in train_dreambooth_flux.py, 512 in train_dreambooth_lora_flux.py; uniform
    # timesteps and loss ("none", SD3's scripts use logit_normal); LoRA alpha 4 whatever the rank; 28 steps for
    # class images (FluxPipeline's default); the target is the velocity noise - latents (upstream's FLUX scripts
    # have no --precondition_outputs, SD3's default to 1)
    parser.set_defaults(max_sequence_length=512 if lora_script else 77, weighting_scheme="none",
                        class_inference_steps=28, precondition_outputs=0)
    if lora_script:
        parser.set_defaults(lora_alpha=4.0)
        for action in parser._actions:
            if "--lora_alpha" in action.option_strings:
                action.help = "LoRA scaling numerator (effective scale alpha/rank); upstream's FLUX default 4"


@register_task
class DreamBoothFluxTask(DreamBoothSD3Task):
    name = "dreambooth_flux"
    description = ("DreamBooth for FLUX.1 (flow matching, packed latents, guidance embedding): fine-tune the "
                   "transformer on a subject's images, with prior preservation.")
    example = "examples/dreambooth/train_dreambooth_flux.py"
    # MindSpeed-MM's FLUX.1-dev full fine-tuning row: 256 px, batch 16 per device, bf16; sharded (the memory plan:
    # 11.9 B parameters x 16 bytes = 190 GB replicated, 23.8 GB per device under FSDP on 8 devices of 64 GB)
    launch = LaunchProfile(
        network="FLUX1_dreambooth", distributed="fsdp",
        pretrained={"resolution": 256, "train_batch_size": 16, "mixed_precision": "bf16", "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_train_steps": 500,
                    "gradient_checkpointing": True, "checkpointing_steps": 500,
                    "instance_prompt": "a photo of sks dog"})
    family = FLUX
    default_resolution = 512
    module_class = DreamBoothFluxModule
    # upstream train_dreambooth_flux.py defaults; full fine-tuning of 12 B parameters shards by default
    defaults = dict(DreamBoothSD3Task.defaults, output_dir="flux-dreambooth", distributed="fsdp")

    @classmethod
    def prepare_embedded(cls, progress: bool = False) -> dict:
        raise UsageError(f"{cls.name}: there is no embedded FLUX.1 model; pass a local FLUX.1 pipeline folder with "
                         "--pretrained_model_name_or_path and the subject's images with --instance_data_dir")

    @classmethod
    def add_arguments(cls, parser) -> None:
        _add_flux_arguments(parser, lora_script=cls.uses_lora)

    def lora_targets(self):
        a = self.args
        if not a.lora_layers:  # upstream's FLUX default, not SD3's
            a.lora_layers = ",".join(FLUX.lora_targets)
        return super().lora_targets()

    def build_module(self):
        module = super().build_module()
        check_packing(self)
        module.guidance_scale = self.args.guidance_scale
        return module


@register_task
class DreamBoothLoraFluxTask(DreamBoothFluxTask):
    name = "dreambooth_lora_flux"
    description = ("DreamBooth-LoRA for FLUX.1: LoRA adapters in the transformer (and the CLIP encoder with "
                   "--train_text_encoder) learn a subject; writes pytorch_lora_weights.safetensors.")
    example = "examples/dreambooth/train_dreambooth_lora_flux.py"
    defaults = dict(DreamBoothFluxTask.defaults, output_dir="flux-dreambooth-lora", distributed="ddp")
    uses_lora = True
    # upstream's README LoRA settings at 512 px, with AdamW at 1e-4 (upstream's README picks Prodigy, which
    # --optimizer=prodigy gives); adapters replicate on DDP
    launch = LaunchProfile(
        network="FLUX1_dreambooth_lora", distributed="ddp",
        pretrained={"resolution": 512, "train_batch_size": 1, "gradient_accumulation_steps": 4,
                    "mixed_precision": "bf16", "learning_rate": 1e-4, "lr_scheduler": "constant",
                    "lr_warmup_steps": 0, "max_train_steps": 500, "gradient_checkpointing": True,
                    "checkpointing_steps": 500, "instance_prompt": "a photo of sks dog"})
