"""The distributed engine: which of accelerate's engines wraps the task module (``--distributed``).

* ``ddp``       -- ``DistributedDataParallel`` through ``accelerator.prepare``: bucketed gradient all-reduce
                   overlapped with the backward, ``no_sync`` on accumulation micro-steps.
* ``fsdp``      -- accelerate's FSDP plugin (FSDP2, ``fully_shard``): parameters, gradients and optimizer
                   state sharded over the ranks; UNet transformer and ResNet blocks (and SD3 / FLUX transformer
                   blocks) are the wrapping units;
                   parameters are all-gathered in the autocast dtype and gradients reduced in fp32.
* ``deepspeed`` -- accelerate's DeepSpeed plugin, ZeRO stage ``--zero_stage`` (2 or 3); optional dependency
                   (``pip install diffusers-npu[deepspeed]``); DeepSpeed then owns loss scaling.

One process wraps nothing (``--distributed`` is reported as ``none``). This module never moves a
gradient itself: the engines do all collective communication.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

from ..errors import UsageError

DISTRIBUTED_MODES = ("ddp", "fsdp", "deepspeed")
#: blocks that become one FSDP unit each (UNet transformer and ResNet blocks, text encoder layers, the SD3 / FLUX
#: transformer blocks)
FSDP_WRAP_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer", "JointTransformerBlock",
                     "SD3SingleTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def deepspeed_config(zero_stage: int, mixed_precision: str, train_batch_size: int,
                     gradient_accumulation_steps: int = 1, max_grad_norm: Optional[float] = None,
                     offload_optimizer: bool = False) -> dict:
    """The DeepSpeed config this project runs with (``--distributed deepspeed --zero_stage N``)."""
    if zero_stage not in (2, 3):
        raise UsageError(f"--zero_stage must be 2 or 3 (got {zero_stage})")
    zero = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if zero_stage == 3:
        # Saving gathers nothing on rank 0: models are exported tensor by tensor (see weights.py).
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


def _fsdp_plugin(module, mixed_precision: str):
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    present = {type(m).__name__ for m in module.modules()}
    wrap = [c for c in FSDP_WRAP_CLASSES if c in present]
    policy = None
    if mixed_precision in ("fp16", "bf16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    kwargs = dict(fsdp_version=2, reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
                  auto_wrap_policy="transformer_based_wrap" if wrap else "no_wrap",
                  transformer_cls_names_to_wrap=wrap or None)
    if policy is not None:
        kwargs["mixed_precision_policy"] = policy
    return FullyShardedDataParallelPlugin(**kwargs)


def _deepspeed_plugin(args):
    try:
        import deepspeed  # noqa: F401  (only whether it imports)
    except ImportError:
        raise UsageError("--distributed deepspeed needs DeepSpeed, which is not installed: "
                         "pip install 'diffusers-npu[deepspeed]' (or pip install deepspeed)") from None
    from accelerate.utils import DeepSpeedPlugin

    cfg = deepspeed_config(args.zero_stage, args.mixed_precision, args.train_batch_size,
                           args.gradient_accumulation_steps, args.max_grad_norm)
    return DeepSpeedPlugin(hf_ds_config=cfg)


def make_accelerator(args, module, device_kind: str, world_size: int):
    """The Accelerator for this run, with the plugin of ``args.distributed`` (``none`` for one process)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    mode = args.distributed if world_size > 1 else "none"
    kwargs = {}
    if mode == "fsdp":
        kwargs["fsdp_plugin"] = _fsdp_plugin(module, args.mixed_precision)
    elif mode == "deepspeed":
        kwargs["deepspeed_plugin"] = _deepspeed_plugin(args)
        kwargs["mixed_precision"] = args.mixed_precision  # DeepSpeed owns precision
    elif mode == "ddp":
        # Every trainable parameter takes part in every step; the default (False) keeps DDP cheap.
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    trackers = None if args.report_to in ("none", "") else args.report_to
    # A new run in the same process (tests, the self-check, notebooks) gets a fresh engine state: accelerate
    # keeps it in a process-wide singleton that refuses a different plugin otherwise. The process group
    # (PartialState) stays.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        acc = Accelerator(cpu=device_kind == "cpu", log_with=trackers,
                          project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                              logging_dir=os.path.join(args.output_dir,
                                                                                       args.logging_dir)),
                          **kwargs)
    except (ValueError, ImportError) as e:
        if trackers and any(t in str(e) for t in str(trackers).split(",")):  # accelerate names the tracker
            raise UsageError(f"--report_to {args.report_to}: {e}") from None
        raise
    if mode == "fsdp" and device_kind == "cpu":
        _enable_fsdp_on_cpu(acc, kwargs["fsdp_plugin"])
    return acc


def _enable_fsdp_on_cpu(acc, plugin) -> None:
    """accelerate only turns its FSDP path on for accelerator devices (on CPU it quietly falls back to DDP),
    although torch's FSDP2 runs on CPU with gloo. Switching the distributed type of its shared state lets
    CPU runs (and this project's CI) go through accelerate's real FSDP2 code path."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def no_sync(accelerator, model, skip_sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP); FSDP and DeepSpeed handle their own."""
    if not skip_sync or accelerator.num_processes == 1:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def is_sharded(num_processes: int, args) -> bool:
    """Whether the trained weights are split over the ranks (FSDP, or DeepSpeed ZeRO-3)."""
    return num_processes > 1 and (args.distributed == "fsdp" or
                                  (args.distributed == "deepspeed" and args.zero_stage == 3))
