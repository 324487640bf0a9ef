"""The distributed engine: which of accelerate's engines wraps the task module (``--distributed``).

* ``ddp``       -- ``DistributedDataParallel`` through ``accelerator.prepare``: bucketed gradient all-reduce
                   overlapped with the backward, ``no_sync`` on accumulation micro-steps.
* ``fsdp``      -- accelerate's FSDP plugin (FSDP2, ``fully_shard``): parameters, gradients and optimizer
                   state sharded over the ranks; UNet transformer and ResNet blocks are the wrapping units.
* ``deepspeed`` -- accelerate's DeepSpeed plugin, ZeRO stage ``--zero_stage`` (2 or 3); optional dependency
                   (``pip install diffusers-npu[deepspeed]``).

One process never wraps anything. This module builds the plugins and the DeepSpeed config; the
:class:`~diffusers_npu.train.loop.Trainer` calls :func:`make_accelerator`.
"""
from __future__ import annotations

import json
from typing import Optional

DISTRIBUTED_MODES = ("ddp", "fsdp", "deepspeed")
#: diffusers blocks that become one FSDP unit each (the UNet's transformer and ResNet blocks, and the
#: text encoders' layers when they train).
FSDP_WRAP_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")


def deepspeed_config(zero_stage: int, mixed_precision: str, train_batch_size: int,
                     gradient_accumulation_steps: int = 1, max_grad_norm: Optional[float] = None,
                     offload_optimizer: bool = False) -> dict:
    """The DeepSpeed config this project runs with (``--distributed deepspeed --zero_stage N``)."""
    if zero_stage not in (2, 3):
        from ..errors import UsageError

        raise UsageError(f"--zero_stage must be 2 or 3 (got {zero_stage})")
    zero = {
        "stage": zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if zero_stage == 3:
        # Saving gathers nothing on rank 0: checkpoints are written shard by shard (see checkpointing.py).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": int(train_batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "gradient_clipping": float(max_grad_norm) if max_grad_norm else 0.0,
        "zero_optimization": zero,
        "fp16": {"enabled": mixed_precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": mixed_precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deepspeed_config_json(**kwargs) -> str:
    return json.dumps(deepspeed_config(**kwargs), indent=1, sort_keys=True)
