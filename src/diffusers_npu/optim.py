"""Optimizers and gradient clipping for NPU, CUDA and CPU.

``build_optimizer(name, params, lr, ...)`` names:

* ``adamw``          -- ``torch.optim.AdamW`` with the multi-tensor (foreach) implementation.
* ``fused_adamw``    -- ``torch_npu.optim.NpuFusedAdamW`` when the parameters live on an NPU, otherwise
  ``torch.optim.AdamW(fused=True)`` (CUDA and, since torch 2.4, CPU); falls back to ``adamw`` with a
  warning where the fused kernel is unavailable.
* ``megatron_adamw`` -- :class:`MegatronAdamW`: the per-parameter ``torch_npu.npu_apply_adam_w`` kernel
  (what Ascend's Megatron fork uses) on NPU, the same decoupled-weight-decay update in torch ops elsewhere.
* ``adamw_8bit``     -- ``bitsandbytes.optim.AdamW8bit`` (optional dependency).

NPU paths are chosen from the *parameters'* device type (via ``diffusers_npu.device.tensor_device_type``,
the test seam), never from a global setting, and torch_npu is only reached through
``diffusers_npu.device.get_torch_npu``.

``clip_grad_norm`` unscales fp16 gradients before measuring them. The original port called
``optimizer.clip_grad_norm_fused_()`` directly under a loss scaler and so clipped still-scaled gradients:
effectively never clipping, and reporting a norm ``scale`` times too large.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Optional, Tuple

import torch

from . import device as _device


OPTIMIZER_NAMES = ("adamw", "fused_adamw", "megatron_adamw", "adamw_8bit")


# ------------------------------------------------------------------------------------------ helpers
def _iter_tensors(params: list):
    for item in params:
        if isinstance(item, dict):
            yield from item["params"]
        else:
            yield item


def _params_device_type(params: list) -> str:
    for tensor in _iter_tensors(params):
        return _device.tensor_device_type(tensor)
    return "cpu"


def _materialize(params) -> list:
    if isinstance(params, torch.Tensor):
        return [params]
    params = list(params)
    if not params:
        raise ValueError("build_optimizer got an empty parameter list.")
    # Param groups may hold generators; make them lists so that peeking at the device consumes nothing.
    return [
        {**p, "params": [p["params"]] if isinstance(p["params"], torch.Tensor) else list(p["params"])}
        if isinstance(p, dict)
        else p
        for p in params
    ]


def _unwrap(optimizer):
    """Strip wrappers such as accelerate's AcceleratedOptimizer (which keeps the real one in .optimizer)."""
    seen = set()
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _torch_adamw(params, lr, betas, eps, weight_decay, **impl):
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **impl)


# ------------------------------------------------------------------------------------ MegatronAdamW
class MegatronAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with the NPU one-kernel update.

    On NPU each parameter is updated by ``torch_npu.npu_apply_adam_w(..., out=(param, exp_avg,
    exp_avg_sq))``. That kernel multiplies the ``beta*_power`` arguments by ``beta*`` once more before
    bias-correcting (see Ascend's reference implementation of the op), so step ``t`` (1-based) passes
    ``beta**(t-1)``, as Ascend's MindSpeed AdamW does. Elsewhere the identical update runs as torch ops;
    both match ``torch.optim.AdamW`` (amsgrad=False, maximize=False).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MegatronAdamW does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if _device.tensor_device_type(p) == "npu":
                    torch_npu = _device.get_torch_npu()
                    if torch_npu is None:
                        raise RuntimeError("MegatronAdamW: parameters are on an NPU but torch_npu cannot be imported.")
                    torch_npu.npu_apply_adam_w(
                        beta1 ** (step - 1),
                        beta2 ** (step - 1),
                        lr,
                        weight_decay,
                        beta1,
                        beta2,
                        eps,
                        p.grad,
                        None,  # max_grad_norm: only used with amsgrad
                        False,  # amsgrad
                        False,  # maximize
                        out=(p.data, exp_avg, exp_avg_sq),
                    )
                else:
                    _adamw_update_(p, p.grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
        return loss


def _adamw_update_(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """In-place AdamW step, the same formula as torch.optim.AdamW's single-tensor path."""
    p.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# ----------------------------------------------------------------------------------- build_optimizer
def build_optimizer(
    name: str,
    params,
    lr: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (one of ``OPTIMIZER_NAMES``) over ``params`` (tensors or param groups)."""
    key = str(name).strip().lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}.")
    params = _materialize(params)
    kind = _params_device_type(params)
    betas = tuple(betas)

    if key == "adamw":
        return _torch_adamw(params, lr, betas, eps, weight_decay, foreach=True)

    if key == "fused_adamw":
        if kind == "npu":
            torch_npu = _device.get_torch_npu()
            fused_cls = getattr(getattr(torch_npu, "optim", None), "NpuFusedAdamW", None) if torch_npu else None
            if fused_cls is not None:
                return fused_cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False)
            warnings.warn("fused_adamw: torch_npu.optim.NpuFusedAdamW is unavailable; using foreach AdamW.")
            return _torch_adamw(params, lr, betas, eps, weight_decay, foreach=True)
        try:
            # torch validates device/dtype support for the fused kernel at construction time.
            return _torch_adamw(params, lr, betas, eps, weight_decay, fused=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            warnings.warn(f"fused_adamw: torch's fused AdamW is unavailable on {kind!r} ({exc}); using foreach AdamW.")
            return _torch_adamw(params, lr, betas, eps, weight_decay, foreach=True)

    if key == "megatron_adamw":
        return MegatronAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    # adamw_8bit
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "Optimizer 'adamw_8bit' needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(or pip install diffusers-npu[8bit])."
        ) from exc
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def optimizer_name_from_flags(use_megatron_npu_adamW: bool, use_npu_fuse_adamW: bool, use_8bit_adam: bool = False) -> str:
    """Map the original port's command-line flags to a ``build_optimizer`` name."""
    chosen = [
        name
        for flag, name in (
            (use_megatron_npu_adamW, "megatron_adamw"),
            (use_npu_fuse_adamW, "fused_adamw"),
            (use_8bit_adam, "adamw_8bit"),
        )
        if flag
    ]
    if len(chosen) > 1:
        raise ValueError(
            "--use_megatron_npu_adamW, --use_npu_fuse_adamW and --use_8bit_adam are mutually exclusive; "
            f"got {' + '.join(chosen)}."
        )
    return chosen[0] if chosen else "adamw"


# ------------------------------------------------------------------------------------ grads helpers
def _unscale_once(unscale) -> None:
    """Run a GradScaler unscale; tolerate "already unscaled this step" (then the grads are unscaled)."""
    try:
        unscale()
    except RuntimeError as exc:
        if "already been called" not in str(exc):
            raise


def clip_grad_norm(
    optimizer,
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    accelerator=None,
    *,
    scaler: Optional["torch.amp.GradScaler"] = None,
    norm_type: float = 2.0,
) -> float:
    """Clip gradients to ``max_norm`` and return the total norm measured BEFORE clipping, as a float.

    Gradients are always unscaled first when a loss scaler is in use:

    * ``accelerator`` given: for ordinary optimizers ``accelerator.clip_grad_norm_`` (it unscales through
      its GradScaler under fp16, and handles FSDP/DeepSpeed); for the NPU fused optimizer
      ``accelerator.unscale_gradients(optimizer)`` then ``clip_grad_norm_fused_``.
    * ``scaler`` given (a ``torch.amp.GradScaler``): ``scaler.unscale_(optimizer)`` first.

    If the gradients were already unscaled this step, that is detected and not done twice. With the
    fused optimizer the clip covers all of that optimizer's parameters (it works on its flat buffers).
    Under DeepSpeed accelerate returns no norm; then this returns ``nan``.
    """
    if accelerator is not None and scaler is not None:
        raise ValueError("clip_grad_norm: pass either accelerator= or scaler=, not both.")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    inner = _unwrap(optimizer)
    fused_clip = getattr(inner, "clip_grad_norm_fused_", None)

    if accelerator is not None:
        if callable(fused_clip):
            _unscale_once(lambda: accelerator.unscale_gradients(optimizer=optimizer))
            norm = fused_clip(max_norm, norm_type)
        else:
            try:
                norm = accelerator.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            except RuntimeError as exc:
                if "already been called" not in str(exc):
                    raise
                # Someone unscaled already this step; the gradients are real-valued, clip them directly.
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    else:
        if scaler is not None and scaler.is_enabled():
            _unscale_once(lambda: scaler.unscale_(inner))
        if callable(fused_clip):
            norm = fused_clip(max_norm, norm_type)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    if norm is None:
        return float("nan")
    return float(norm)


def zero_grad(optimizer, set_to_none: bool = True) -> None:
    """``optimizer.zero_grad`` that also works with optimizers refusing ``set_to_none=True``.

    torch_npu's fused optimizers keep gradients as views into one flat buffer and raise on
    ``set_to_none=True``; for them the gradients are zeroed in place instead.
    """
    if set_to_none and getattr(_unwrap(optimizer), "is_fused_optimizer", False):
        set_to_none = False
    if not set_to_none:
        optimizer.zero_grad(set_to_none=False)
        return
    try:
        optimizer.zero_grad(set_to_none=True)
    except (ValueError, RuntimeError):
        optimizer.zero_grad(set_to_none=False)


__all__ = [
    "OPTIMIZER_NAMES",
    "MegatronAdamW",
    "build_optimizer",
    "clip_grad_norm",
    "optimizer_name_from_flags",
    "zero_grad",
]
