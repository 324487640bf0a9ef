"""Stable Diffusion XL text-to-image: fine-tune the UNet (or LoRA adapters in it, and optionally in both text
encoders) on image-caption pairs, conditioned on both encoders' states, encoder 2's pooled embedding and each
sample's micro-conditioning time ids (see :mod:`..sdxl`).

Two registered tasks share this file, as upstream has two scripts:

* ``text_to_image_sdxl`` (``train_text_to_image_sdxl.py``): full fine-tuning by default (``--use_lora`` for
  adapters). On several processes it defaults to ``--distributed fsdp``: the SDXL UNet's weights, gradients
  and AdamW state (about 42 GB in fp32) do not fit one device replicated.
* ``text_to_image_lora_sdxl`` (``train_text_to_image_lora_sdxl.py``): always LoRA, DDP by default; the output
  is ``pytorch_lora_weights.safetensors`` for ``StableDiffusionXLPipeline.load_lora_weights``.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

from ..registry import LaunchProfile, register_task
from ..sd import Frozen, load_unet_like, save_unet_like
from ..sdxl import SDXLModule, SDXLTask, add_timestep_bias_arguments, add_vae_argument, check_sdxl_flags
from . import lora

logger = logging.getLogger(__name__)

# Ascend's SDXL suite (8 devices, 1024 px): full fine-tune batch 24 fp16, LoRA batch 7; upstream README's
# hyper-parameters otherwise.
PRETRAINED_FULL = {"resolution": 1024, "train_batch_size": 24, "mixed_precision": "fp16", "center_crop": True,
                   "random_flip": True, "proportion_empty_prompts": 0.2, "learning_rate": 1e-06,
                   "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_train_steps": 10000,
                   "gradient_checkpointing": True, "checkpointing_steps": 5000, "dataloader_num_workers": 4}
PRETRAINED_LORA = {"resolution": 1024, "train_batch_size": 7, "mixed_precision": "fp16", "random_flip": True,
                   "learning_rate": 1e-04, "lr_scheduler": "constant", "lr_warmup_steps": 0, "num_train_epochs": 2,
                   "checkpointing_steps": 500, "dataloader_num_workers": 4}


class TextToImageSDXLModule(SDXLModule):
    """forward(batch) -> (loss, {}): latents, both encoders' states + pooled embedding, time ids, predict."""

    def forward(self, batch):
        gens = self.objective.generators(batch)
        latents = self.latents(batch, gens)
        embeds, pooled = self.prompt(batch)
        noisy, t, target = self.objective.noisy(latents, gens)
        pred = self.unet(noisy, t, embeds, added_cond_kwargs=self.added_cond(batch, pooled), return_dict=False)[0]
        return self.objective.loss(pred, target, t), {}


@register_task
class TextToImageSDXLTask(SDXLTask):
    name = "text_to_image_sdxl"
    description = ("Fine-tune a Stable Diffusion XL UNet (or LoRA adapters with --use_lora) on image-caption "
                   "pairs, with per-sample micro-conditioning from the real crop.")
    example = "examples/text_to_image/train_text_to_image_sdxl.py"
    launch = LaunchProfile(network="StableDiffusionXL_text_to_image", distributed="fsdp", learning_check=True,
                           embedded={"config": "examples/text_to_image/configs/embedded_digits_sdxl.yaml"},
                           pretrained=PRETRAINED_FULL)
    # output folder by mode, as upstream's two SDXL text-to-image scripts (resolve_args)
    defaults = {"output_dir": None, "distributed": "fsdp"}
    supports_cache = True
    supports_buckets = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        add_vae_argument(parser)
        lora.add_lora_arguments(parser)
        parser.add_argument("--train_text_encoder", action="store_true",
                            help="with --use_lora: LoRA on both text encoders' attention too")
        add_timestep_bias_arguments(parser)
        parser.add_argument("--debug_loss", action="store_true",
                            help="upstream LoRA flag (per-file loss to the tracker): not applied here, the loss is "
                                 "logged per step; a warning says so")

    @classmethod
    def resolve_args(cls, a) -> None:
        if a.output_dir is None:
            a.output_dir = "sd-model-finetuned-lora" if a.use_lora else "sdxl-model-finetuned"
        if a.validation_epochs is None and not a.validation_steps:
            a.validation_epochs = 1  # upstream's default for both SDXL text-to-image scripts

    @property
    def use_lora(self) -> bool:
        return bool(self.args.use_lora)

    @property
    def output_kind(self) -> str:  # noqa: D102 - the class attribute, per run
        return "lora" if self.use_lora else "pipeline"

    def validate_args(self) -> None:
        from ...errors import UsageError

        lora.validate_lora_args(self.args)
        check_sdxl_flags(self)
        if self.use_lora and self.args.learning_check:
            raise UsageError("--learning_check loads --output_dir as a full pipeline; a --use_lora run writes only "
                             "the adapters (drop one)")
        if self.args.debug_loss:
            logger.warning("--debug_loss: per-file losses are not logged by this trainer (it logs the step loss "
                           "and the task's metrics); the flag has no effect")

    # ------------------------------------------------------------------------------------------ models
    def build_module(self):
        a, rt = self.args, self.rt
        # LoRA: the frozen UNet runs in the autocast dtype (as upstream), except when FSDP shards it, which
        # needs one dtype per unit (the adapters are fp32 master weights).
        unet_dtype = rt.weight_dtype if self.use_lora and not rt.sharded else torch.float32
        self.load_components(unet_dtype=unet_dtype)
        if self.use_lora:
            lora.add_lora(self.unet, a.lora_rank, a.lora_alpha, lora.UNET_TARGETS, a.lora_dropout)
            if a.train_text_encoder:
                self.lora_text_encoders()
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)
        return TextToImageSDXLModule(frozen, self.objective(), rt.weight_dtype, unet=self.unet,
                                     **self.trained_text_encoders())

    def build_dataset(self):
        return self.image_caption_dataset()

    # ------------------------------------------------------------------------------------------ outputs
    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        if self.use_lora:
            return self.save_lora_output(folder, final=False)
        return save_unet_like(self.unet, folder, self.rt, ema_state)

    def load_trained(self, folder: str) -> Optional[dict]:
        if self.use_lora:
            self.load_lora_trained(folder)
            return None
        return load_unet_like(self.unet, folder)

    def save_final(self, folder: str) -> List[str]:
        if self.use_lora:
            return self.save_lora_output(folder, final=True)
        return self.save_pipeline_output(folder)


@register_task
class TextToImageLoraSDXLTask(TextToImageSDXLTask):
    name = "text_to_image_lora_sdxl"
    description = ("LoRA for Stable Diffusion XL text-to-image (optionally on both text encoders with "
                   "--train_text_encoder); writes pytorch_lora_weights.safetensors.")
    example = "examples/text_to_image/train_text_to_image_lora_sdxl.py"
    launch = LaunchProfile(network="StableDiffusionXL_lora", distributed="ddp",
                           embedded={"train_batch_size": 16, "max_train_steps": 300, "learning_rate": 1e-3,
                                     "lr_scheduler": "constant", "lr_warmup_steps": 0, "rank": 8,
                                     "checkpointing_steps": 300, "cache_latents": True},
                           pretrained=PRETRAINED_LORA)
    defaults = {"output_dir": None, "use_lora": True, "distributed": "ddp"}
