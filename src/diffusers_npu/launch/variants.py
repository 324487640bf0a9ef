"""The eight 8-device text-to-image runs of the original ModelZoo README, as one table (and the SD3 / FLUX.1
performance runs, :data:`SD3_TABLE`).

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


# Stable Diffusion 3 / FLUX.1 performance runs (test/train_performance_8p_*_{sd3,flux}.sh): the task's pretrained
# LaunchProfile on SD3-medium ($SD3_MODEL) or FLUX.1-dev ($FLUX_MODEL) and a subject folder ($INSTANCE_DIR) or
# data set ($DATASET_NAME), 1000 steps.
SD3_TABLE = {
    "performance_8p_dreambooth_sd3": "dreambooth_sd3",
    "performance_8p_dreambooth_lora_sd3": "dreambooth_lora_sd3",
    "performance_8p_controlnet_sd3": "controlnet_sd3",
    "performance_8p_controlnet_flux": "controlnet_flux",
}
SD3_MODEL_ENV, SD3_DEFAULT_MODEL = "SD3_MODEL", "stabilityai/stable-diffusion-3-medium-diffusers"
FLUX_MODEL_ENV, FLUX_DEFAULT_MODEL = "FLUX_MODEL", "black-forest-labs/FLUX.1-dev"
SD3_DATA = {"dreambooth_sd3": "diffusers/dog-example", "dreambooth_lora_sd3": "diffusers/dog-example",
            "controlnet_sd3": "fusing/fill50k", "controlnet_flux": "fusing/fill50k"}


def _sd3_variant(name: str) -> Variant:
    from ..train.registry import get_task

    task = get_task(SD3_TABLE[name])
    kind_flags, suffix = KINDS["performance"]
    data = {"instance_data_dir": os.environ["INSTANCE_DIR"]} if os.environ.get("INSTANCE_DIR") and \
        not task.name.startswith("controlnet") else {"dataset_name": os.environ.get(DATASET_ENV) or SD3_DATA[task.name]}
    env, model = (FLUX_MODEL_ENV, FLUX_DEFAULT_MODEL) if task.name.endswith("flux") else (SD3_MODEL_ENV,
                                                                                          SD3_DEFAULT_MODEL)
    flags = {**task.launch.pretrained, "pretrained_model_name_or_path": os.environ.get(env) or model, **data,
             **kind_flags}
    return Variant(name=name, task=task.name, network=task.launch.network, num_devices=8, case_suffix=suffix,
                   flags=flags)


def get_variant(name: str) -> Variant:
    """The variant called ``name``, its model and data set resolved from the environment now."""
    if name in SD3_TABLE:
        return _sd3_variant(name)
    if name not in TABLE:
        raise UsageError(f"unknown --variant {name!r}; known: {', '.join(sorted(TABLE) + sorted(SD3_TABLE))}")
    family, precision, kind = TABLE[name]
    env, model, resolution = FAMILIES[family]
    kind_flags, suffix = KINDS[kind]
    flags = {"pretrained_model_name_or_path": os.environ.get(env) or model,
             "dataset_name": os.environ.get(DATASET_ENV) or DEFAULT_DATASET,
             "resolution": resolution, **COMMON, **PRECISIONS[precision], **kind_flags}
    return Variant(name=name, task="text_to_image", network=f"StableDiffusion_{family}_text_to_image_{precision}",
                   num_devices=8, case_suffix=suffix, flags=flags)


__all__ = ["SD3_TABLE", "TABLE", "Variant", "get_variant"]
