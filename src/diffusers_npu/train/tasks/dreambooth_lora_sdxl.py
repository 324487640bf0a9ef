"""DreamBooth-LoRA for Stable Diffusion XL: LoRA adapters in the UNet (and, with ``--train_text_encoder``, in
both text encoders) learn a subject from a few images bound to a rare identifier ("a photo of sks digit").

The DreamBooth side (instance images, the default instance images from the data source, prior preservation
with class images generated once by the model being trained -- here the SDXL pipeline -- and reused on later
runs, the instance + prior loss split) is :class:`~.dreambooth.DreamBoothTask`'s; this file adds what SDXL
needs: both text encoders (the prompts are encoded once unless the encoders train), each image's
micro-conditioning time ids from its real crop, and the SDXL LoRA output (``pytorch_lora_weights.safetensors``
for ``StableDiffusionXLPipeline.load_lora_weights``; ``--output_kohya_format`` also writes the kohya layout).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch

from ...errors import UsageError
from ..registry import LaunchProfile, register_task
from ..sd import Frozen
from ..sdxl import SDXLModule, SDXLTask, add_vae_argument, encode_prompt
from . import lora
from .dreambooth import DreamBoothTask

logger = logging.getLogger(__name__)

KOHYA_NAME = "pytorch_lora_weights_kohya.safetensors"


def add_prodigy_arguments(add) -> None:
    """Upstream's Prodigy options (type=bool, default True: a value follows the flag), read by --optimizer prodigy."""
    for flag, text in (("--prodigy_beta3", "Prodigy's beta3 (default: the square root of beta2)"),
                       ("--prodigy_decouple", "Prodigy's decoupled weight decay (AdamW style)"),
                       ("--prodigy_use_bias_correction", "Prodigy's bias correction"),
                       ("--prodigy_safeguard_warmup", "Prodigy's safeguard during the warm-up")):
        kind = dict(type=float, default=None) if flag == "--prodigy_beta3" else dict(type=_bool, default=True)
        add(flag, help=f"{text}; read only by --optimizer prodigy", **kind)


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


class DreamBoothSDXLModule(SDXLModule):
    """forward(batch) -> (instance + w * prior loss, {instance_loss, prior_loss}); instance and class samples go
    through the UNet in one forward, each with its own prompt, pooled embedding and time ids."""

    def __init__(self, *args, prior_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_loss_weight = prior_loss_weight

    def forward(self, batch):
        prior = "class_pixel_values" in batch
        pixels = batch["pixel_values"]
        n = pixels.shape[0]
        embeds, pooled = self.prompt(batch)
        cond = self.added_cond(batch, pooled)
        if prior:
            class_embeds, class_pooled = self.prompt(batch, "class_")
            class_cond = self.added_cond(batch, class_pooled, "class_")
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            embeds = torch.cat([embeds, class_embeds])
            cond = {k: torch.cat([v, class_cond[k]]) for k, v in cond.items()}
        gens = self.objective.prior_generators(batch, prior)
        latents = self.latents({"pixel_values": pixels}, gens)
        noisy, t, target = self.objective.noisy(latents, gens)
        pred = self.unet(noisy, t, embeds, added_cond_kwargs=cond, return_dict=False)[0]
        per = self.objective.loss(pred, target, t, reduce=False)
        return self.objective.prior_preservation(per, n, self.prior_loss_weight)


@register_task
class DreamBoothLoraSDXLTask(SDXLTask, DreamBoothTask):
    name = "dreambooth_lora_sdxl"
    description = ("DreamBooth-LoRA for Stable Diffusion XL: LoRA adapters learn a subject from a few images "
                   "(prior preservation with class images made by the SDXL pipeline).")
    example = "examples/dreambooth/train_dreambooth_lora_sdxl.py"
    launch = LaunchProfile(
        network="StableDiffusionXL_dreambooth_lora",
        embedded={"train_batch_size": 4, "max_train_steps": 200, "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "rank": 8, "with_prior_preservation": True, "prior_loss_weight": 1.0,
                  "num_class_images": 20, "class_inference_steps": 10, "checkpointing_steps": 200},
        pretrained={"resolution": 1024, "train_batch_size": 1, "gradient_accumulation_steps": 4,
                    "mixed_precision": "fp16", "learning_rate": 1e-4, "lr_scheduler": "constant",
                    "lr_warmup_steps": 0, "max_train_steps": 500, "checkpointing_steps": 500,
                    "instance_prompt": "a photo of sks dog"})
    # upstream's train_dreambooth_lora_sdxl.py defaults
    defaults = {"use_lora": True, "learning_rate": 1e-4, "output_dir": "lora-dreambooth-model", "train_batch_size": 4,
                "num_train_epochs": 1, "validation_steps": None, "adam_weight_decay": 1e-4}
    output_kind = "lora"

    @classmethod
    def add_arguments(cls, parser) -> None:
        DreamBoothTask.add_arguments(parser)
        add_vae_argument(parser)
        g = parser.add_argument_group("DreamBooth-LoRA SDXL (upstream flags)")
        have = {o for a in parser._actions for o in a.option_strings}

        def add(flag, **kw):  # the SD DreamBooth task may already define some of them
            if flag not in have:
                g.add_argument(flag, **kw)

        add("--repeats", type=int, default=1, help="how many times each instance image is repeated per epoch")
        add("--text_encoder_lr", type=float, default=5e-6,
            help="upstream: learning rate of the text encoders' adapters. The trainer has one parameter group, so "
                 "with --train_text_encoder they train at --learning_rate (a warning says so)")
        add("--adam_weight_decay_text_encoder", type=float, default=1e-3,
            help="upstream: weight decay of the text encoders' adapters; they use --adam_weight_decay here (one "
                 "parameter group; a warning says so with --train_text_encoder)")
        add("--use_dora", action="store_true", help="upstream flag (DoRA adapters): refused, not supported here")
        add("--output_kohya_format", action="store_true",
            help="also write the LoRA in kohya's layout (pytorch_lora_weights_kohya.safetensors) for WebUI tools")
        add("--do_edm_style_training", action="store_true",
            help="upstream flag (EDM-style training for EDM-scheduler models such as Playground v2.5): refused")
        add_prodigy_arguments(add)

    @classmethod
    def resolve_args(cls, a) -> None:
        if a.validation_epochs is None and not a.validation_steps:
            a.validation_epochs = 50  # upstream's default for this script

    def validate_args(self):
        a = self.args
        refused = [(a.use_dora, "--use_dora: DoRA adapters are not supported here; use plain LoRA (drop the flag)"),
                   (a.do_edm_style_training, "--do_edm_style_training: EDM-style training (Playground v2.5) is not "
                                             "supported here; this task trains DDPM-style SDXL models"),
                   (a.class_labels_conditioning, "--class_labels_conditioning: SDXL UNets take no class labels"),
                   (a.text_encoder_use_attention_mask, "--text_encoder_use_attention_mask: SDXL's text encoders "
                                                       "are used without a mask, as in its pipelines"),
                   (a.repeats < 1, f"--repeats must be >= 1 (got {a.repeats})")]
        for bad, message in refused:
            if bad:
                raise UsageError(message)
        super().validate_args()
        if a.skip_save_text_encoder:
            logger.warning("--skip_save_text_encoder: the output holds only LoRA weights; the flag has no effect")

    def optimizer_groups(self, params):
        """As upstream: the text encoders' adapters get --text_encoder_lr and --adam_weight_decay_text_encoder."""
        a = self.args
        if not a.train_text_encoder:
            return None
        te_ids = {id(p) for te in (self.text_encoder, self.text_encoder_2) for p in te.parameters()}
        unet = [p for p in params if id(p) not in te_ids]
        te = [p for p in params if id(p) in te_ids]
        return [{"params": unet},
                {"params": te, "lr": a.text_encoder_lr or a.learning_rate,
                 "weight_decay": a.adam_weight_decay_text_encoder}]

    # ------------------------------------------------------------------------------------------ models
    def build_module(self):
        a, rt = self.args, self.rt
        # the frozen UNet runs in the autocast dtype (one dtype per unit when FSDP shards it)
        self.load_components(unet_dtype=torch.float32 if rt.sharded else rt.weight_dtype)
        if a.tokenizer_max_length:
            self.tokenizer.model_max_length = self.tokenizer_2.model_max_length = a.tokenizer_max_length
        lora.add_lora(self.unet, a.lora_rank, a.lora_alpha, lora.UNET_TARGETS, a.lora_dropout)
        if a.train_text_encoder:
            self.lora_text_encoders()
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)
        return DreamBoothSDXLModule(frozen, self.objective(), rt.weight_dtype, unet=self.unet,
                                    **self.trained_text_encoders(), prior_loss_weight=a.prior_loss_weight)

    def checkpointing_models(self):
        return [self.unet] + list(self.trained_text_encoders().values())

    def ema_model(self):
        return None

    # -------------------------------------------------------------------------------------------- data
    def encode_prompt(self, prompt: str) -> dict:
        """A sample's text fields: token ids of both tokenizers when the encoders train, else the prompt's
        states and pooled embedding, encoded once here."""
        ids = self.tokenize(prompt)
        if self.args.train_text_encoder:
            return ids
        with torch.no_grad():
            embeds, pooled = encode_prompt((self.text_encoder, self.text_encoder_2),
                                           [ids["input_ids"][None], ids["input_ids_2"][None]])
        return {"prompt_embeds": embeds[0].float().cpu(), "pooled_prompt_embeds": pooled[0].float().cpu()}

    def instance_images(self) -> List[str]:
        return DreamBoothTask.instance_images(self) * self.args.repeats

    # ------------------------------------------------------------------------------------------ outputs
    def pipeline(self):
        import diffusers

        pipe = self.sd_pipeline()
        if self.args.validation_scheduler:
            pipe.scheduler = getattr(diffusers, self.args.validation_scheduler).from_config(pipe.scheduler.config)
        return pipe

    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        return self.save_lora_output(folder, final=False)

    def load_trained(self, folder: str) -> Optional[dict]:
        self.load_lora_trained(folder)
        return None

    def save_final(self, folder: str) -> List[str]:
        files = self.save_lora_output(folder, final=True)
        if self.args.output_kohya_format and self.rt.is_main:
            files.append(write_kohya(folder))
        return files


def write_kohya(folder: str) -> str:
    """The diffusers LoRA file converted to kohya's layout (``lora_unet_*`` / ``lora_te1_*`` / ``lora_te2_*``)."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(folder, lora.LORA_WEIGHTS_NAME))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
    # transformers 5's CLIP text models have no ``text_model`` level; kohya's tools expect it in the names
    fixed = {}
    for key, value in kohya.items():
        for te in ("lora_te1_", "lora_te2_"):
            if key.startswith(te) and not key.startswith(te + "text_model_"):
                key = te + "text_model_" + key[len(te):]
        fixed[key] = value.contiguous()
    save_file(fixed, os.path.join(folder, KOHYA_NAME))
    return KOHYA_NAME
