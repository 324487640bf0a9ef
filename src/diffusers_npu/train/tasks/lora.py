"""LoRA for any Stable Diffusion task: ``--use_lora --lora_rank R`` (text-to-image, DreamBooth).

peft injects low-rank adapters into the attention projections (UNet: ``to_q/to_k/to_v/to_out.0``; text
encoder: ``q_proj/k_proj/v_proj/out_proj``); the base weights are frozen, so only the adapters receive
gradients. The adapters start as a no-op (B = 0), train in fp32 (master weights, autocast in the step), and
are saved with ``StableDiffusionPipeline.save_lora_weights`` as ``pytorch_lora_weights.safetensors``, which
``pipeline.load_lora_weights(output_dir)`` reads back onto the base model.

Checkpoints need nothing special: the Trainer saves the trainable modules' state dicts, which hold the
adapter weights under the same names on resume (the adapters are injected before the checkpoint is loaded).

Use :class:`LoraMixin` as the first base of a task (``class MyTask(LoraMixin, DiffusionTask)``) and call
:meth:`LoraMixin.save_lora` from the task's ``save_final``.
"""
from __future__ import annotations

import json
import logging
import os

import torch

logger = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora_arguments(parser) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--use_lora", action="store_true",
                   help="train LoRA adapters on the attention projections instead of the full weights; the "
                        "result is pytorch_lora_weights.safetensors (pipeline.load_lora_weights)")
    g.add_argument("--lora_rank", type=int, default=4, help="rank of the LoRA adapters")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA scaling numerator (effective scale alpha/rank); default: the rank (scale 1)")


def add_lora(module: torch.nn.Module, rank: int, alpha: float | None, targets) -> list[torch.nn.Parameter]:
    """Freeze ``module`` and inject LoRA adapters (fp32, B = 0) into ``targets``; return the adapter params."""
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(module, "peft_config", None):
        raise ValueError(f"{type(module).__name__} already has LoRA adapters")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    # peft's own entry point (the models' add_adapter wrappers pin peft versions; this works across them)
    inject_adapter_in_model(config, module)
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if not params:
        raise ValueError(f"no LoRA target ({', '.join(targets)}) found in {type(module).__name__}")
    return params


def lora_state_dict(module: torch.nn.Module) -> dict:
    """The adapter weights of ``module`` in diffusers' naming (what ``save_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


class LoraMixin:
    """Adds ``--use_lora/--lora_rank/--lora_alpha`` to a :class:`~diffusers_npu.train.task.DiffusionTask`."""

    @staticmethod
    def add_arguments(parser) -> None:
        add_lora_arguments(parser)

    @property
    def use_lora(self) -> bool:
        return bool(getattr(self.args, "use_lora", False))

    def validate_args(self) -> None:
        super().validate_args()
        a = self.args
        if not self.use_lora:
            return
        from ..args import ConfigError

        if a.lora_rank < 1:
            raise ConfigError(f"--lora_rank must be >= 1 (got {a.lora_rank})")
        if a.learning_check:
            # The check reloads --output_dir as a full pipeline; a LoRA run writes only the adapters.
            logger.info("--use_lora: the learning check is skipped (the output holds only LoRA weights)")
            a.learning_check = False

    def load_models(self, device, weight_dtype):
        super().load_models(device, weight_dtype)
        if self.use_lora:
            params = add_lora(self.unet, self.args.lora_rank, self.args.lora_alpha, UNET_TARGETS)
            logger.info("LoRA rank %d on the UNet: %d trainable tensors, %.2fM parameters", self.args.lora_rank,
                        len(params), sum(p.numel() for p in params) / 1e6)

    def add_text_encoder_lora(self) -> None:
        add_lora(self.text_encoder, self.args.lora_rank, self.args.lora_alpha, TEXT_ENCODER_TARGETS)

    def save_lora(self, folder: str, text_encoder_trained: bool = False) -> bool:
        """Write ``pytorch_lora_weights.safetensors`` (+ ``lora_info.json``) if LoRA is on; return whether it did."""
        if not self.use_lora:
            return False
        from diffusers import StableDiffusionPipeline

        te = lora_state_dict(self.text_encoder) if text_encoder_trained else None
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_state_dict(self.unet),
                                                  text_encoder_lora_layers=te, safe_serialization=True)
        a = self.args
        with open(os.path.join(folder, "lora_info.json"), "w") as f:
            json.dump({"base_model": a.pretrained_model_name_or_path, "rank": a.lora_rank,
                       "alpha": a.lora_alpha if a.lora_alpha is not None else a.lora_rank,
                       "unet_targets": list(UNET_TARGETS),
                       "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if te else [],
                       "load_with": "pipeline.load_lora_weights(this_folder)"}, f, indent=1)
        return True
