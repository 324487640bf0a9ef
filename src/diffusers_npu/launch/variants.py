"""The eight 8-device text-to-image runs of the original ModelZoo README, as one table.

``test/train_{full,performance}_8p_text_to_image_*.sh`` each pass ``--variant=<their name>`` (the script
name without ``train_`` and ``.sh``); everything that differs between them is here. The default model and
data set are the original Hub ids, or ``$SD15_MODEL`` / ``$SD21_MODEL`` / ``$DATASET_NAME`` (the old scripts'
variables); ``--model_name=`` / ``--dataset_name=`` override either.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict

from ..errors import UsageError

# name: (model family, precision set, run kind) -- one row per launch script.
TABLE = {
    "full_8p_text_to_image_sd1-5_fp16": ("sd1-5", "fp16", "full"),
    "full_8p_text_to_image_sd1-5_fp32": ("sd1-5", "fp32", "full"),
    "full_8p_text_to_image_sd2-1_fp16": ("sd2-1", "fp16", "full"),
    "full_8p_text_to_image_sd2-1_fp16_fa": ("sd2-1", "fp16_fa", "full"),
    "full_8p_text_to_image_sd2-1_fp32": ("sd2-1", "fp32", "full"),
    "performance_8p_text_to_image_sd1-5_fp16": ("sd1-5", "fp16", "performance"),
    "performance_8p_text_to_image_sd1-5_fp32": ("sd1-5", "fp32", "performance"),
    "performance_8p_text_to_image_sd2-1_fp32": ("sd2-1", "fp32", "performance"),
}

# family: (environment variable, default model, resolution)
FAMILIES = {
    "sd1-5": ("SD15_MODEL", "runwayml/stable-diffusion-v1-5", 512),
    "sd2-1": ("SD21_MODEL", "stabilityai/stable-diffusion-2-1", 768),
}
DATASET_ENV, DEFAULT_DATASET = "DATASET_NAME", "lambdalabs/pokemon-blip-captions"

COMMON = {"train_batch_size": 4, "mixed_precision": "fp16", "center_crop": True, "random_flip": True,
          "lr_scheduler": "constant", "lr_warmup_steps": 0, "learning_rate": 1e-05, "max_grad_norm": 1,
          "dataloader_num_workers": 8, "enable_pin_memory": True, "enable_persistent_workers": True}
PRECISIONS = {
    # fp32 and plain fp16 compute attention scores in fp32 (fp16 bmm overflows on SD 2.1 at 768 px).
    "fp32": {"mixed_precision": "no", "attention": "upcast"},
    "fp16": {"attention": "upcast"},
    "fp16_fa": {"train_batch_size": 24, "enable_npu_flash_attention": True, "gradient_checkpointing": True,
                "use_ema": True},
}
# kind: (flags, CaseName suffix). Performance runs are short and write no tracker events.
KINDS = {
    "full": ({"max_train_steps": 15000, "checkpointing_steps": 5000}, "acc"),
    "performance": ({"max_train_steps": 1000, "checkpointing_steps": 100000, "report_to": "none"}, "perf"),
}


@dataclass(frozen=True)
class Variant:
    name: str
    task: str
    network: str
    num_devices: int
    case_suffix: str
    flags: Dict[str, object] = field(default_factory=dict)


def get_variant(name: str) -> Variant:
    """The variant called ``name``, its model and data set resolved from the environment now."""
    if name not in TABLE:
        raise UsageError(f"unknown --variant {name!r}; known: {', '.join(sorted(TABLE))}")
    family, precision, kind = TABLE[name]
    env, model, resolution = FAMILIES[family]
    kind_flags, suffix = KINDS[kind]
    flags = {"pretrained_model_name_or_path": os.environ.get(env) or model,
             "dataset_name": os.environ.get(DATASET_ENV) or DEFAULT_DATASET,
             "resolution": resolution, **COMMON, **PRECISIONS[precision], **kind_flags}
    return Variant(name=name, task="text_to_image", network=f"StableDiffusion_{family}_text_to_image_{precision}",
                   num_devices=8, case_suffix=suffix, flags=flags)


__all__ = ["TABLE", "Variant", "get_variant"]
