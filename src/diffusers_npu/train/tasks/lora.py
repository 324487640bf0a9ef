"""LoRA for the Stable Diffusion tasks: ``--use_lora --rank R [--lora_alpha A]``.

peft injects low-rank adapters into the attention projections (UNet ``to_q/to_k/to_v/to_out.0``; CLIP
``q_proj/k_proj/v_proj/out_proj``); the base weights are frozen, so only the adapters train. The adapters
start as a no-op (B = 0), train as fp32 master weights (autocast in the step), and are written with the
pipeline class's ``save_lora_weights`` as ``pytorch_lora_weights.safetensors``, which
``pipeline.load_lora_weights(folder)`` reads onto the base model. Checkpoints also keep the adapters under
peft's own names (``lora_adapters.safetensors``, a few MB) so that a resume restores them bit for bit.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch

from ...errors import CheckpointError
from .. import weights

logger = logging.getLogger(__name__)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTERS_NAME = "lora_adapters.safetensors"


def add_lora_arguments(parser) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--use_lora", action="store_true",
                   help="train LoRA adapters on the attention projections instead of the full weights; the result "
                        "is pytorch_lora_weights.safetensors (pipeline.load_lora_weights)")
    g.add_argument("--rank", "--lora_rank", dest="lora_rank", type=int, default=4, metavar="R",
                   help="rank of the LoRA adapters (upstream --rank)")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA scaling numerator (effective scale alpha/rank); default: the rank (scale 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout probability of the LoRA layers")


def validate_lora_args(args) -> None:
    from ...errors import UsageError

    if not getattr(args, "use_lora", False):
        return
    if args.lora_rank < 1:
        raise UsageError(f"--rank must be >= 1 (got {args.lora_rank})")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    if args.use_ema:
        raise UsageError("--use_ema averages full weights; with --use_lora only the adapters train (drop one)")


def add_lora(module: torch.nn.Module, rank: int, alpha: Optional[float], targets,
             dropout: float = 0.0) -> List[torch.nn.Parameter]:
    """Freeze ``module`` and inject LoRA adapters (fp32, B = 0) into ``targets``; return the adapter params."""
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(module, "peft_config", None):
        raise ValueError(f"{type(module).__name__} already has LoRA adapters")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(targets), lora_dropout=dropout)
    # peft's own entry point (the models' add_adapter wrappers pin peft versions; this works across them)
    inject_adapter_in_model(config, module)
    params = [p for n, p in module.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if not params:
        raise ValueError(f"no LoRA target ({', '.join(targets)}) found in {type(module).__name__}")
    return params


def adapter_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters' whole tensors under their module names (collective when sharded)."""
    keys = [k for k in module.state_dict() if "lora_" in k]
    return weights.gathered_state_dict(module, only=keys)


def _diffusers_layers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """peft module names -> the names diffusers' save_lora_weights expects."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers({k.replace(".default", ""): v for k, v in state.items()})


def save_lora(folder: str, rt, unet, text_encoder=None, pipeline_cls_name: str = "StableDiffusionPipeline",
              text_encoder_2=None) -> List[str]:
    """``pytorch_lora_weights.safetensors`` (users) + ``lora_adapters.safetensors`` (exact resume)."""
    import diffusers

    unet_sd = adapter_state(unet)
    te_sd = adapter_state(text_encoder) if text_encoder is not None else None
    te2_sd = adapter_state(text_encoder_2) if text_encoder_2 is not None else None
    if not rt.is_main:
        return []
    os.makedirs(folder, exist_ok=True)
    cls = getattr(diffusers, pipeline_cls_name)
    kwargs = {"unet_lora_layers": _diffusers_layers(unet_sd)}
    if te_sd:
        kwargs["text_encoder_lora_layers"] = _diffusers_layers(te_sd)
    if te2_sd:
        kwargs["text_encoder_2_lora_layers"] = _diffusers_layers(te2_sd)
    cls.save_lora_weights(folder, safe_serialization=True, **kwargs)
    exact = {f"unet.{k}": v for k, v in unet_sd.items()}
    exact.update({f"text_encoder.{k}": v for k, v in (te_sd or {}).items()})
    exact.update({f"text_encoder_2.{k}": v for k, v in (te2_sd or {}).items()})
    weights.save_state_dict(exact, os.path.join(folder, ADAPTERS_NAME))
    return [LORA_WEIGHTS_NAME, ADAPTERS_NAME]


def load_lora(folder: str, unet, text_encoder=None, text_encoder_2=None) -> None:
    """Restore adapters saved by :func:`save_lora` (or an older full ``unet.safetensors``)."""
    from safetensors.torch import load_file

    exact = os.path.join(folder, ADAPTERS_NAME)
    if not os.path.isfile(exact):
        old = os.path.join(folder, "unet.safetensors")
        if os.path.isfile(old):  # earlier versions kept the whole UNet state dict, adapters included
            weights.load_pretrained(unet, folder, weights_name="unet.safetensors")
            if text_encoder is not None and os.path.isfile(os.path.join(folder, "text_encoder.safetensors")):
                weights.load_pretrained(text_encoder, folder, weights_name="text_encoder.safetensors")
            return
        raise CheckpointError(f"--resume_from_checkpoint: {folder} has no {ADAPTERS_NAME} (was it written by a run "
                              f"without --use_lora?)")
    sd = load_file(exact)
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder), ("text_encoder_2.", text_encoder_2)):
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if module is None:
            continue
        expected = [k for k in module.state_dict() if "lora_" in k]
        if sorted(part) != sorted(expected):
            raise CheckpointError(f"--resume_from_checkpoint: {exact} does not match the adapters being trained "
                                  f"(rank or targets changed?)")
        weights.load_state_into(module, part, where=exact)


def save_lora_layers(folder: str, rt, pipeline_cls_name: str, models: Dict[str, torch.nn.Module]) -> List[str]:
    """Adapters of pipeline components named as the pipeline names them (``transformer``, ``text_encoder``,
    ``text_encoder_2``) -> ``<pipeline>.save_lora_weights(<name>_lora_layers=...)`` in peft's key layout (what
    upstream's SD3 / FLUX scripts write) + ``lora_adapters.safetensors`` (exact resume). Collective when
    sharded; the main process writes."""
    import diffusers

    states = {name: adapter_state(m) for name, m in models.items()}
    if not rt.is_main:
        return []
    os.makedirs(folder, exist_ok=True)
    layers = {f"{name}_lora_layers": {k.replace(".default", ""): v for k, v in sd.items()}
              for name, sd in states.items()}
    getattr(diffusers, pipeline_cls_name).save_lora_weights(folder, safe_serialization=True, **layers)
    weights.save_state_dict({f"{name}.{k}": v for name, sd in states.items() for k, v in sd.items()},
                            os.path.join(folder, ADAPTERS_NAME))
    return [LORA_WEIGHTS_NAME, ADAPTERS_NAME]


def load_lora_layers(folder: str, models: Dict[str, torch.nn.Module]) -> None:
    """Restore adapters written by :func:`save_lora_layers` into ``models`` (same names)."""
    from safetensors.torch import load_file

    exact = os.path.join(folder, ADAPTERS_NAME)
    if not os.path.isfile(exact):
        raise CheckpointError(f"--resume_from_checkpoint: {folder} has no {ADAPTERS_NAME} (was it written by a run "
                              f"without LoRA?)")
    sd = load_file(exact)
    for name, module in models.items():
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        expected = [k for k in module.state_dict() if "lora_" in k]
        if sorted(part) != sorted(expected):
            raise CheckpointError(f"--resume_from_checkpoint: {exact} does not match the adapters being trained "
                                  f"(rank, targets or --train_text_encoder changed?)")
        weights.load_state_into(module, part, where=exact)
