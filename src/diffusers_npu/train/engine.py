"""The training engine: ONE object that decides how the task module is spread over the processes and owns
everything that differs between engines (backward, accumulation, clipping, the optimizer step, optimizer state
on disk, collective decisions). The loop (loop.py) reads the same for every engine.

``Engine.kind`` is decided once, by :func:`choose`, from ``--distributed``, ``--zero_stage`` and the world size:

* ``none``  -- one process: the module is only moved to the device.
* ``ddp``   -- ``DistributedDataParallel`` through ``accelerator.prepare``: bucketed gradient all-reduce
               overlapped with the backward; accelerate's ``accumulate`` skips it (``no_sync``) on
               accumulation micro-steps.
* ``fsdp``  -- accelerate's FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over the
               ranks; the blocks in :data:`FSDP_WRAP_CLASSES` are the wrapping units; parameters are gathered
               in the autocast dtype and gradients reduced in fp32.
* ``zero2`` / ``zero3`` -- DeepSpeed ZeRO stage 2 / 3 through accelerate's DeepSpeed plugin (optional
               dependency, ``pip install --no-build-isolation -e ".[deepspeed]" in the checkout``). DeepSpeed owns loss scaling, gradient
               clipping (``gradient_clipping`` = ``--max_grad_norm``) and the optimizer step, which it takes
               inside ``backward`` of the last micro-batch of a step.

Accumulation is accelerate's gradient state for every engine: ``accelerator.accumulate`` marks the micro-step
that syncs, ``accelerator.backward`` divides the loss by ``--gradient_accumulation_steps`` (DeepSpeed divides
in its own backward, never twice), and the optimizer steps once per optimizer step, as does the schedule.

accelerate turns FSDP and DeepSpeed on only for accelerator devices; on CPU it silently wraps the module in
DDP instead. torch's FSDP2 and DeepSpeed (its CPU accelerator, over gloo without oneCCL) both run on CPU, so
:meth:`Engine.make_accelerator` sets accelerate's shared state to the engine asked for, and after
``prepare`` checks that the module really is that engine's: a mismatch stops the run at start-up.
This module never moves a gradient itself: the engines do all collective communication.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..errors import UsageError

ENGINES = ("none", "ddp", "fsdp", "zero2", "zero3")
#: blocks that become one FSDP unit each: UNet transformer and ResNet blocks, text encoder layers, and the
#: SD3 / FLUX transformer blocks
FSDP_WRAP_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer", "JointTransformerBlock",
                     "SD3SingleTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def choose(distributed: str, zero_stage: int, world_size: int) -> str:
    """THE decision of which engine trains (one of :data:`ENGINES`); nothing else in the project decides it."""
    if world_size <= 1 or distributed in (None, "none"):
        return "none"
    if distributed == "deepspeed":
        return f"zero{int(zero_stage)}"
    return distributed


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
    from accelerate.utils import FullyShardedDataParallelPlugin

    present = {type(m).__name__ for m in module.modules()}
    wrap = [c for c in FSDP_WRAP_CLASSES if c in present]
    kwargs = dict(fsdp_version=2, reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
                  auto_wrap_policy="transformer_based_wrap" if wrap else "no_wrap",
                  transformer_cls_names_to_wrap=wrap or None)
    if mixed_precision in ("fp16", "bf16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
        kwargs["mixed_precision_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(**kwargs)


def _deepspeed_plugin(args):
    try:
        import deepspeed  # noqa: F401  (only whether it imports)
    except ImportError:
        raise UsageError("--distributed deepspeed needs DeepSpeed, which is not installed: "
                         "pip install --no-build-isolation -e '.[deepspeed]' in the checkout (or pip install --no-build-isolation deepspeed)") from None
    from accelerate.utils import DeepSpeedPlugin

    cfg = deepspeed_config(args.zero_stage, args.mixed_precision, args.train_batch_size,
                           args.gradient_accumulation_steps, args.max_grad_norm)
    return DeepSpeedPlugin(hf_ds_config=cfg)


def _force_distributed_type(kind: Optional[str], plugin=None, mixed_precision: str = "no") -> None:
    """Make accelerate's shared state say the engine asked for (see the module docstring). accelerate re-copies
    PartialState's fields into AcceleratorState whenever one is constructed, so both are set, as accelerate
    itself sets them for DeepSpeed on a GPU. ``kind=None`` restores the process-wide default."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    partial = PartialState._shared_state
    if "_dnpu_default_type" not in partial:
        partial["_dnpu_default_type"] = partial.get("distributed_type")
    if kind is None:
        partial["distributed_type"] = partial["_dnpu_default_type"]
        return
    new = DistributedType.FSDP if kind == "fsdp" else DistributedType.DEEPSPEED
    partial["distributed_type"] = new
    state = AcceleratorState()
    state.distributed_type = new
    if kind == "fsdp":
        state.fsdp_plugin = plugin
    else:
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state._mixed_precision = "no"  # DeepSpeed owns precision (its config), as accelerate does on GPUs


def reset_process_state() -> None:
    """Forget the previous run's engine. A new run in the same process (tests, the self-check, the benchmark,
    notebooks) must not inherit it: accelerate keeps it in a process-wide singleton and, for DeepSpeed, an
    environment variable; transformers keeps ZeRO-3's config globally (then every ``from_pretrained`` would
    partition the model it loads). The process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    _force_distributed_type(None)
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # an older transformers
        return
    unset_hf_deepspeed_config()


class Engine:
    """How the task module trains over the processes; see the module docstring."""

    def __init__(self, kind: str, world_size: int = 1, rank: int = 0, device_kind: str = "cpu"):
        if kind not in ENGINES:
            raise ValueError(f"unknown engine {kind!r}; one of {ENGINES}")
        self.kind = kind
        self.world_size = world_size
        self.rank = rank
        self.device_kind = device_kind
        if device_kind == "cpu":
            # DeepSpeed (imported by transformers' save_pretrained wherever it is installed) would otherwise probe
            # for accelerators and log that it fell back to CPU; a CPU run must never pick a GPU for it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.accelerator = None
        self.model = None       # the module as the engine wraps it
        self.optimizer = None   # the optimizer that steps (DeepSpeed's wrapper under ZeRO)

    @classmethod
    def from_args(cls, args, world_size: int, rank: int) -> "Engine":
        return cls(choose(args.distributed, args.zero_stage, world_size), world_size, rank, args.device)

    # ------------------------------------------------------------------------------------------ what it is
    @property
    def is_deepspeed(self) -> bool:
        return self.kind in ("zero2", "zero3")

    @property
    def is_sharded(self) -> bool:
        """Whether the trained weights are split over the ranks (FSDP, ZeRO-3)."""
        return self.kind in ("fsdp", "zero3")

    @property
    def owns_precision(self) -> bool:
        """DeepSpeed scales the loss, casts the module and clips; the Trainer's autocast/GradScaler stand down."""
        return self.is_deepspeed

    @property
    def distributed(self) -> str:
        """The ``--distributed`` value that chose this engine (``none`` for one process)."""
        return "deepspeed" if self.is_deepspeed else self.kind

    def check_args(self, args) -> None:
        """Flags a given engine cannot honour, refused at start with what to do instead."""
        if self.is_deepspeed and args.max_bad_steps:
            raise UsageError("--max_bad_steps is not available with --distributed deepspeed (DeepSpeed takes the "
                             "optimizer step inside its backward, before a step could be skipped; its fp16 loss "
                             "scaling skips overflowed steps itself); use --distributed ddp or fsdp")
        if getattr(args, "optimizer", None) == "prodigy" and (self.is_sharded or self.is_deepspeed):
            raise UsageError(f"--optimizer prodigy is not available with --distributed {args.distributed}: Prodigy "
                             f"estimates its step size from sums over whole parameters, which a shard does not "
                             f"hold; use --distributed ddp (or one process), or --optimizer adamw")
        if self.kind == "zero3" and args.use_ema:
            raise UsageError("--use_ema is not available with --distributed deepspeed --zero_stage 3 (the weights "
                             "are partitioned placeholders outside the forward); use --zero_stage 2 or fsdp")

    # ------------------------------------------------------------------------------------------- set up
    def make_accelerator(self, args, module):
        """The Accelerator for this run, with the plugin of this engine and accelerate's gradient state."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        kwargs, plugin = {}, None
        if self.kind == "fsdp":
            kwargs["fsdp_plugin"] = plugin = _fsdp_plugin(module, args.mixed_precision)
        elif self.is_deepspeed:
            kwargs["deepspeed_plugin"] = plugin = _deepspeed_plugin(args)
            kwargs["mixed_precision"] = args.mixed_precision  # DeepSpeed owns precision
        elif self.kind == "ddp":
            # Every trainable parameter takes part in every step, unless the module says otherwise (SDXL's text
            # encoder LoRA); the default (False) keeps DDP cheap.
            unused = bool(getattr(module, "has_unused_parameters", False))
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=unused)]
        trackers = None if args.report_to in ("none", "") else args.report_to
        reset_process_state()
        try:
            acc = Accelerator(cpu=self.device_kind == "cpu", log_with=trackers,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              project_config=ProjectConfiguration(
                                  project_dir=args.output_dir,
                                  logging_dir=os.path.join(args.output_dir, args.logging_dir)),
                              **kwargs)
        except (ValueError, ImportError) as e:
            if trackers and any(t in str(e) for t in str(trackers).split(",")):  # accelerate names the tracker
                raise UsageError(f"--report_to {args.report_to}: {e}") from None
            raise
        if plugin is not None and self.device_kind == "cpu":
            _force_distributed_type(self.kind, plugin, args.mixed_precision)
        self.accelerator = acc
        return acc

    def prepare(self, module, optimizer):
        """Wrap ``module`` (and, under DeepSpeed, the optimizer) in this engine; check it is the engine asked for.
        The learning-rate schedule stays the Trainer's: it steps once per optimizer step whatever the engine."""
        acc = self.accelerator
        if self.kind == "none":
            self.model, self.optimizer = module.to(acc.device), optimizer
        elif self.is_deepspeed:
            self.model, self.optimizer = acc.prepare(module, optimizer)
        else:
            # The raw optimizer stays ours: precision (autocast, GradScaler) is done by the Trainer, and under
            # FSDP accelerate swaps the optimizer's parameters for their shards in place.
            self.model, _ = acc.prepare(module, optimizer)
            self.optimizer = optimizer
        self._check_running()
        return self.model

    def running(self) -> str:
        """The engine the prepared module really is (read from the module, not from the flags)."""
        m = self.model
        name = type(m).__name__
        if name == "DeepSpeedEngine":
            return f"zero{m.zero_optimization_stage()}"
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            return "ddp"
        if any(type(x).__name__.startswith("FSDP") for x in m.modules()):
            return "fsdp"
        return "none"

    def _check_running(self) -> None:
        running = self.running()
        if running != self.kind:
            raise UsageError(f"--distributed: asked for {self.kind} but accelerate prepared {running} "
                             f"({type(self.model).__name__}) on {self.device_kind}; refusing to train with an engine "
                             f"that was not asked for")

    def close(self) -> None:
        """After the run: release the engine's process-wide state (see :func:`reset_process_state`)."""
        if self.accelerator is not None and self.kind != "none":
            reset_process_state()

    def unwrap(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model) if self.kind != "none" else self.model

    def trainable_parameters(self):
        """The parameters the optimizer updates, as the engine holds them (FSDP: DTensor shards)."""
        return [p for p in self.unwrap().parameters() if p.requires_grad]

    # -------------------------------------------------------------------------------------------- a step
    def accumulate(self):
        """Around each micro-batch: accelerate's gradient state decides whether this micro-step syncs (no_sync
        on the others under DDP/FSDP; DeepSpeed's accumulation boundary)."""
        return self.accelerator.accumulate(self.model)

    @property
    def sync_gradients(self) -> bool:
        """True on the last micro-batch of an optimizer step."""
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor, precision) -> None:
        """Backward of one micro-batch (the loss divided by the accumulation steps exactly once). Under DeepSpeed
        the last micro-batch's backward also clips and steps the optimizer."""
        self.accelerator.backward(precision.scale(loss))

    def clip_and_step(self, precision, max_norm: float, set_to_none: bool = True) -> Optional[torch.Tensor]:
        """After the last micro-batch: unscale, clip to ``max_norm`` (global over the ranks: FSDP's norm is
        of the DTensor gradients, DeepSpeed's its own), step and zero the gradients. Returns the gradient norm
        before clipping as a device tensor (None without clipping). No host sync."""
        from ..optim import clip_grad_norm, zero_grad

        if self.is_deepspeed:  # already stepped in backward()
            if not max_norm:
                return None
            norm = self.model.get_global_grad_norm()
            return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).reshape(())
        norm = None
        if max_norm:
            precision.unscale_(self.optimizer)
            norm = clip_grad_norm(self.optimizer, self.trainable_parameters(), max_norm)
        precision.step(self.optimizer)
        zero_grad(self.optimizer, set_to_none=set_to_none)
        return norm

    def skip_step(self) -> None:
        """Drop this step's gradients (a bad step every rank agreed to skip)."""
        from ..optim import zero_grad

        zero_grad(self.optimizer, set_to_none=True)

    def any_rank(self, flag, device=None) -> bool:
        """Whether ``flag`` (a bool or a device tensor) holds on any rank: every rank calls it at the same point
        and all get the same answer, so all take the same branch."""
        if self.world_size == 1:
            return bool(flag)
        t = flag.detach().float().reshape(1) if torch.is_tensor(flag) else torch.tensor([1.0 if flag else 0.0])
        t = t.to(device or self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # --------------------------------------------------------------------------------- optimizer state
    def save_optimizer(self, folder: str, is_main: bool) -> None:
        """Optimizer state into ``folder``. ``optimizer/`` through torch.distributed.checkpoint for one process,
        DDP and FSDP: keyed by parameter name, every rank writes what it owns (replicated state once), and a
        different world size or engine reshards it on load. DeepSpeed writes its own ``deepspeed/``."""
        if self.is_deepspeed:
            self.model.save_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer)
        try:
            dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(folder, "optimizer"))
        except Exception as e:  # DCP wraps a rank's error (disk full), maybe twice: raise the error itself
            inner = e
            while getattr(inner, "failures", None):
                failure = next(iter(inner.failures.values()))
                inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
            if inner is e:
                raise
            raise inner from None

    def load_optimizer(self, folder: str) -> None:
        from ..errors import CheckpointError

        if self.is_deepspeed:
            if not os.path.isdir(os.path.join(folder, "deepspeed")):
                raise CheckpointError(f"--resume_from_checkpoint: {folder} was not written under --distributed "
                                      f"deepspeed (no deepspeed/); resume it with the engine that wrote it")
            self.model.load_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
            return
        sharded, single = os.path.join(folder, "optimizer"), os.path.join(folder, "optimizer.pt")
        if os.path.isdir(sharded):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            holder = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
            from torch.distributed.checkpoint import DefaultLoadPlanner

            # Parameters that had no optimizer state when it was saved (no gradient yet, e.g. text-encoder LoRA
            # before its first update) are absent from the checkpoint: they keep the fresh state built here.
            dcp.load(holder, checkpoint_id=sharded, planner=DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(self.model, self.optimizer, holder["optimizer"])
        elif os.path.isfile(single) and not self.is_sharded:  # written by earlier versions
            self.optimizer.load_state_dict(torch.load(single, map_location="cpu", weights_only=False))
        else:
            what = "deepspeed/ (DeepSpeed's)" if os.path.isdir(os.path.join(folder, "deepspeed")) else \
                "optimizer.pt (one process/DDP, earlier version)" if os.path.isfile(single) else "none"
            raise CheckpointError(f"--resume_from_checkpoint: {folder} has no optimizer state this {self.kind} run "
                                  f"can read (it holds {what}); resume with the --distributed mode that wrote it")

