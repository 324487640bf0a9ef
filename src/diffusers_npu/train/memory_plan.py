"""The memory plan of a training run: the bytes per rank that parameters, gradients and optimizer state take
for the chosen engine and world size, printed at start-up, and a refusal, before anything reaches the device,
of a plan that cannot fit it (issue #21 item 4).

Accounting (bytes per parameter, per rank; ``N`` = world size; half = fp16/bf16 mixed precision):

============================ ========================== ============== ==========================
engine                       parameters                 gradients      optimizer state (AdamW)
============================ ========================== ============== ==========================
one process / ``ddp``        trained 4, frozen 4 / 2    trained 4      trained 8
``fsdp`` (FSDP2, full shard) the same / N               4 / N          8 / N
DeepSpeed ZeRO-2             trained and frozen 2 (4)   2 / N (4 / N)  12 / N (8 / N)
DeepSpeed ZeRO-3             2 / N (4 / N)              2 / N (4 / N)  12 / N (8 / N)
============================ ========================== ============== ==========================

Outside DeepSpeed the Trainer keeps the trained weights in fp32 and autocasts (``precision.py``); frozen
weights inside the module (the base model under LoRA) are in the autocast dtype. DeepSpeed keeps the model
in half precision and an fp32 master copy in the optimizer state (ZeRO paper: 2 + 2 + 12 bytes). AdamW keeps
two fp32 moments (8 bytes), 8-bit AdamW two 1-byte ones (2). Frozen models the module only refers to (VAE,
text encoders) are counted at the autocast dtype on every rank. Activations are not counted: the plan is
refused when the counted bytes alone leave less than ``HEADROOM`` of the device for them.

Device memory comes from :func:`diffusers_npu.device.device_memory_bytes` (``$DIFFUSERS_NPU_DEVICE_MEMORY_GB``
declares it); on CPU the plan is printed but never refused.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch

from ..errors import UsageError

#: fraction of the device the counted bytes may take; the rest is for activations and the allocator
HEADROOM = 0.9
GB = 1e9
_OPTIMIZER_BYTES = {"adamw": 8, "fused_adamw": 8, "megatron_adamw": 8, "adamw_8bit": 2,
                    "prodigy": 16}  # Prodigy: exp_avg, exp_avg_sq, s and p0 in fp32


@dataclass(frozen=True)
class MemoryPlan:
    engine: str  # none / ddp / fsdp / zero2 / zero3
    world_size: int
    mixed_precision: str  # no / fp16 / bf16
    optimizer: str
    trained: int  # parameters
    frozen: int  # parameters in the module that do not train (e.g. the base model under LoRA)
    referenced: int  # parameters of frozen models the module refers to (VAE, text encoders)
    device_bytes: Optional[int] = None

    @property
    def half(self) -> bool:
        return self.mixed_precision in ("fp16", "bf16")

    @property
    def lora(self) -> bool:
        return self.frozen > self.trained

    def parts(self) -> dict:
        """Bytes per rank: ``parameters``, ``gradients``, ``optimizer``, ``frozen_models``."""
        n, half = self.world_size, self.half
        frozen_b = 2 if half else 4
        opt = _OPTIMIZER_BYTES.get(self.optimizer, 8)
        if self.engine in ("zero2", "zero3"):
            model_b = 2 if half else 4
            params = (self.trained + self.frozen) * model_b / (n if self.engine == "zero3" else 1)
            grads = self.trained * model_b / n
            optim = self.trained * (opt + (4 if half else 0)) / n  # + the fp32 master copy
        else:
            shard = n if self.engine == "fsdp" else 1
            params = (self.trained * 4 + self.frozen * frozen_b) / shard
            grads = self.trained * 4 / shard
            optim = self.trained * opt / shard
        return {"parameters": params, "gradients": grads, "optimizer": optim,
                "frozen_models": self.referenced * frozen_b}

    @property
    def total(self) -> float:
        return sum(self.parts().values())

    @property
    def usable(self) -> Optional[float]:
        return None if self.device_bytes is None else self.device_bytes * HEADROOM

    def fits(self) -> bool:
        return self.usable is None or self.total <= self.usable

    def describe(self) -> str:
        p = self.parts()
        kind = "LoRA" if self.lora else "full fine-tuning"
        device = (f" of {self.device_bytes / GB:.1f} GB device memory ({HEADROOM:.0%} usable)"
                  if self.device_bytes is not None else " (CPU: not checked against memory)")
        return (f"Memory plan per rank ({engine_name(self.engine)} over {self.world_size} rank(s), "
                f"{self.mixed_precision} precision, {self.optimizer}, {kind}: {_count(self.trained)} trained / "
                f"{_count(self.frozen + self.referenced)} frozen parameters): parameters "
                f"{p['parameters'] / GB:.2f} GB + gradients {p['gradients'] / GB:.2f} GB + optimizer state "
                f"{p['optimizer'] / GB:.2f} GB + frozen models {p['frozen_models'] / GB:.2f} GB = "
                f"{self.total / GB:.2f} GB{device}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def engine_name(engine: str) -> str:
    return {"none": "one process", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}.get(engine, engine)


def engine_of(distributed: str, zero_stage: int, world_size: int) -> str:
    if world_size <= 1:
        return "none"
    if distributed == "deepspeed":
        return f"zero{zero_stage}"
    return distributed


def _flag(engine: str) -> str:
    return {"fsdp": "--distributed fsdp", "zero3": "--distributed deepspeed --zero_stage 3",
            "zero2": "--distributed deepspeed --zero_stage 2", "ddp": "--distributed ddp"}.get(engine, engine)


def _fewest_devices(plan: MemoryPlan, engine: str, max_devices: int) -> Optional[int]:
    for n in range(2, max_devices + 1):
        if replace(plan, engine=engine, world_size=n).fits():
            return n
    return None


def options_that_fit(plan: MemoryPlan, max_devices: int = 4096) -> list:
    """What would fit the device, each as ``(what, bytes per rank)``: FSDP / ZeRO-3 (at this world size when
    it is enough, else on the fewest devices that fit), and LoRA at this engine and world size."""
    found = []
    for engine in ("fsdp", "zero3"):
        if engine == plan.engine:
            continue
        n = _fewest_devices(plan, engine, max_devices)
        if n is None:
            continue
        if n <= plan.world_size:
            alt = replace(plan, engine=engine)
            found.append((f"{_flag(engine)} (fits from {n} devices)", alt.total))
        else:
            found.append((f"{n} or more devices with {_flag(engine)}", replace(plan, engine=engine, world_size=n).total))
    if not plan.lora:
        # LoRA: the model frozen in the autocast dtype; the adapters' own bytes are negligible beside it
        alt = replace(plan, trained=0, frozen=plan.trained + plan.frozen)
        if alt.fits():
            found.append(("LoRA (--use_lora or the task's LoRA script)", alt.total))
    return found


def refusal(plan: MemoryPlan) -> str:
    options = options_that_fit(plan)
    listed = "; ".join(f"{what} ({gb / GB:.1f} GB per rank)" for what, gb in options) or \
        "none of more devices, FSDP / ZeRO-3 or LoRA fits either; use a device with more memory"
    return (f"memory plan: {'LoRA' if plan.lora else 'full fine-tuning'} of {_count(plan.trained + plan.frozen)} "
            f"parameters under {engine_name(plan.engine)} over {plan.world_size} rank(s) needs "
            f"{plan.total / GB:.1f} GB per rank for parameters, gradients, optimizer state and frozen models, more "
            f"than the {plan.usable / GB:.1f} GB usable of this {plan.device_bytes / GB:.1f} GB device; options that "
            f"fit: {listed}")


def _params(modules: Iterable[torch.nn.Module]):
    seen = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def plan_for(module: torch.nn.Module, distributed: str, world_size: int, mixed_precision: str, optimizer: str,
             zero_stage: int = 2, device_bytes: Optional[int] = None) -> MemoryPlan:
    """The plan of training ``module`` (works on the meta device: only shapes are read). Frozen models the
    module refers to through ``module.frozen`` (the tasks' plain holder, see ``sd.Frozen``) are counted too."""
    trained = frozen = 0
    for p in _params([module]):
        if p.requires_grad:
            trained += p.numel()
        else:
            frozen += p.numel()
    holder = getattr(module, "frozen", None)
    refs = [m for m in vars(holder).values() if isinstance(m, torch.nn.Module)] if holder is not None else []
    inside = {id(p) for p in module.parameters()}
    referenced = sum(p.numel() for p in _params(refs) if id(p) not in inside)
    return MemoryPlan(engine_of(distributed, zero_stage, world_size), world_size, mixed_precision, optimizer,
                      trained, frozen, referenced, device_bytes)


def check(t, module: torch.nn.Module) -> MemoryPlan:
    """Print the plan of this run (main rank) and refuse it, with the options that would fit, when it cannot
    fit the device. Called by ``build.module_and_speed`` once the module is built, before the engine."""
    from .. import device as dev

    a, rt = t.args, getattr(t, "rt", None)  # no runtime (a bare model preparation): one process
    world, is_main = (rt.world_size, rt.is_main) if rt is not None else (1, True)
    try:
        device_bytes = dev.device_memory_bytes(rt.device if rt is not None else a.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    plan = plan_for(module, a.distributed, world, a.mixed_precision, a.optimizer, getattr(a, "zero_stage", 2),
                    device_bytes)
    if is_main:
        print(plan.describe(), flush=True)
    if not plan.fits():
        raise UsageError(refusal(plan))
    return plan


__all__ = ["HEADROOM", "MemoryPlan", "check", "engine_of", "options_that_fit", "plan_for", "refusal"]
