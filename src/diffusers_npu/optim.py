"""Optimizers and gradient clipping for NPU, CUDA and CPU.

``build_optimizer(name, params, lr, ...)`` names:

* ``adamw``          -- ``torch.optim.AdamW`` with the multi-tensor (foreach) implementation (its fused
  kernel when ``grad_scaling=True`` on CUDA/CPU, so that an fp16 GradScaler step needs no host sync).
* ``fused_adamw``    -- ``torch_npu.optim.NpuFusedAdamW`` when the parameters live on an NPU, otherwise
  ``torch.optim.AdamW(fused=True)`` (CUDA and, since torch 2.4, CPU); falls back to ``adamw`` with a
  warning where the fused kernel is unavailable.
* ``megatron_adamw`` -- :class:`MegatronAdamW`: the per-parameter ``torch_npu.npu_apply_adam_w`` kernel
  (what Ascend's Megatron fork uses) on NPU, the same decoupled-weight-decay update in torch ops elsewhere.
* ``adamw_8bit``     -- ``bitsandbytes.optim.AdamW8bit`` (optional dependency).
* ``prodigy``        -- ``prodigyopt.Prodigy`` (optional dependency), upstream's choice in the SD3 / FLUX / SDXL
  DreamBooth READMEs; its options come in ``prodigy`` (beta3, decouple, use_bias_correction, safeguard_warmup).

NPU paths are chosen from the *parameters'* device type (via ``diffusers_npu.device.tensor_device_type``,
the test seam), never from a global setting, and torch_npu is only reached through
``diffusers_npu.device.get_torch_npu``.

``clip_grad_norm`` unscales fp16 gradients before measuring them, and returns the norm as a device tensor.
The original port called ``optimizer.clip_grad_norm_fused_()`` directly under a loss scaler and so clipped
still-scaled gradients: effectively never clipping, and reporting a norm ``scale`` times too large.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Tuple

import torch

from . import device as _device


OPTIMIZER_NAMES = ("adamw", "fused_adamw", "megatron_adamw", "adamw_8bit", "prodigy")
# The parallel engines an optimizer is built for (the engine object of train/ passes its name).
ENGINES = ("none", "ddp", "fsdp", "zero2", "zero3")


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


def _is_dtensor(tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or hasattr(tensor, "device_mesh")


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

    fp16 without host synchronisation (CUDA / CPU): the torch path sets ``_step_supports_amp_scaling``, so
    ``GradScaler.step`` hands it ``grad_scale`` and ``found_inf`` (device tensors, as for torch's fused
    AdamW) instead of reading ``found_inf`` on the host; the step unscales the gradients and, where
    ``found_inf`` is set, keeps parameters, moments and step count unchanged (``torch.where`` on the device).
    The NPU path cannot: ``npu_apply_adam_w`` takes host scalars and always writes, so with NPU parameters
    the flag is off and the (torch_npu) scaler checks for overflow on the host before stepping.

    ``state["step"]`` is a 0-dim float64 tensor: on the parameter's device for the torch path (so skipping
    stays on the device), on the CPU for the NPU path (read as a host number for the kernel's scalars).
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
        on_npu = any(_device.tensor_device_type(p) == "npu" for g in self.param_groups for p in g["params"])
        # An instance attribute: GradScaler reads it with getattr() on the optimizer it is given.
        self._step_supports_amp_scaling = not on_npu

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step for optimizers with _step_supports_amp_scaling (None when not scaling, or
        # when the gradients were unscaled already by scaler.unscale_).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MegatronAdamW does not support sparse gradients.")
                npu = _device.tensor_device_type(p) == "npu"
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not torch.is_tensor(state["step"]):  # new state, or a checkpoint from an int-step release
                    # float64: bias corrections like 1 - 0.999**t lose 1e-5 relative in float32.
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float64,
                                                 device="cpu" if npu else p.device)
                if npu:
                    if grad_scale is not None or found_inf is not None:
                        raise RuntimeError("MegatronAdamW: NPU parameters cannot be stepped with grad_scale/"
                                           "found_inf; use torch_npu's GradScaler (make_grad_scaler('npu')).")
                    _npu_adamw_update_(p, state, lr, beta1, beta2, eps, weight_decay)
                else:
                    _adamw_update_(p, p.grad, state, lr, beta1, beta2, eps, weight_decay, grad_scale, found_inf)
        return loss


def _npu_adamw_update_(p, state, lr, beta1, beta2, eps, weight_decay):
    torch_npu = _device.get_torch_npu()
    if torch_npu is None:
        raise RuntimeError("MegatronAdamW: parameters are on an NPU but torch_npu cannot be imported.")
    if state["step"].device.type != "cpu":  # e.g. a checkpoint of a CUDA run resumed on an NPU
        state["step"] = state["step"].cpu()
    state["step"] += 1
    step = int(state["step"])  # a CPU tensor: no device synchronisation
    torch_npu.npu_apply_adam_w(
        beta1 ** (step - 1), beta2 ** (step - 1), lr, weight_decay, beta1, beta2, eps, p.grad,
        None,  # max_grad_norm: only used with amsgrad
        False,  # amsgrad
        False,  # maximize
        out=(p.data, state["exp_avg"], state["exp_avg_sq"]),
    )


def _adamw_update_(p, grad, state, lr, beta1, beta2, eps, weight_decay, grad_scale=None, found_inf=None):
    """AdamW step in torch ops (torch.optim.AdamW's formula), bias correction computed on the device."""
    if state["step"].device != p.device:  # a checkpoint loaded onto another device
        state["step"] = state["step"].to(p.device)
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
    if grad_scale is not None:
        grad.div_(grad_scale.to(grad.device, grad.dtype))  # unscale in place, as scaler.unscale_ would
    if found_inf is None:
        step += 1
        p.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (exp_avg_sq.sqrt() / (1.0 - beta2**step).sqrt()).add_(eps)
        p.sub_(exp_avg / denom * (lr / (1.0 - beta1**step)))
        return
    # found_inf: compute the update out of place, then keep the old values where it was set.
    skip = found_inf.to(p.device).reshape(()) > 0
    step.add_((~skip).to(step.dtype))
    new_avg = torch.lerp(exp_avg, grad, 1.0 - beta1)
    new_sq = exp_avg_sq * beta2 + grad * grad * (1.0 - beta2)
    denom = (new_sq.sqrt() / (1.0 - beta2**step).sqrt()).add_(eps)
    new_p = p * (1.0 - lr * weight_decay) - new_avg / denom * (lr / (1.0 - beta1**step))
    for old, new in ((p, new_p), (exp_avg, new_avg), (exp_avg_sq, new_sq)):
        old.copy_(torch.where(skip, old, new))


# ----------------------------------------------------------------------------------- build_optimizer
def build_optimizer(
    name: str,
    params,
    lr: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scaling: bool = False,
    engine: str = "none",
    prodigy: Optional[dict] = None,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (one of ``OPTIMIZER_NAMES``) over ``params`` (tensors or param groups), valid
    for the parallel ``engine`` (one of ``ENGINES``) that will step it.

    On NPU the torch_npu optimizers are only valid without sharding (``none`` / ``ddp``), see
    :func:`npu_engine_substitute`: under ``fsdp`` (FSDP2's DTensor parameters, which ``npu_combine_tensors``
    and ``npu_apply_adam_w`` cannot take) and under ``zero2`` / ``zero3`` (DeepSpeed assigns new ``.grad``
    tensors, while NpuFusedAdamW keeps stepping the buffers it combined at its first step) every name becomes
    torch's foreach AdamW (the same maths), with a warning.

    ``engine`` comes from :class:`~diffusers_npu.train.engine.Engine` (``none|ddp|fsdp|zero2|zero3``); off NPU
    it does not change the choice.

    ``grad_scaling=True`` (an fp16 GradScaler will step it): on CUDA / CPU choose implementations that
    take the scaler's ``grad_scale`` / ``found_inf`` on the device (:func:`supports_sync_free_amp`), so
    ``scaler.step`` does not wait for the host: ``adamw`` becomes torch's fused AdamW kernel (the same
    maths) where torch has it for these parameters. ``megatron_adamw`` and ``fused_adamw`` already are.
    On NPU nothing changes: torch_npu's scaler checks for overflow on the host whatever the optimizer.
    """
    key = str(name).strip().lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}.")
    engine = str(engine).strip().lower()
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; expected one of {', '.join(ENGINES)}.")
    params = _materialize(params)
    kind = _params_device_type(params)
    betas = tuple(betas)
    if kind == "npu":
        why = npu_engine_substitute(key, engine)
        if why is not None:
            warnings.warn(f"{key} under {engine} on NPU: {why}; using torch's foreach AdamW (the same update).")
            return _torch_adamw(params, lr, betas, eps, weight_decay, foreach=True)

    if key == "adamw":
        if grad_scaling and kind in ("cuda", "cpu"):
            try:
                return _torch_adamw(params, lr, betas, eps, weight_decay, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass  # no fused kernel here (old torch, dtype): foreach, and the scaler syncs per step
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

    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise ImportError("Optimizer 'prodigy' needs prodigyopt, which is not installed: pip install prodigyopt "
                              "(or, from the checkout, pip install -e \".[prodigy]\").") from exc
        options = {k: v for k, v in (prodigy or {}).items() if v is not None}
        return Prodigy(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)

    # adamw_8bit
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError(
            "Optimizer 'adamw_8bit' needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(or, from the checkout, pip install -e \".[8bit]\")."
        ) from exc
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def npu_engine_substitute(name: str, engine: str) -> Optional[str]:
    """Why optimizer ``name`` cannot run under ``engine`` on NPU (None = it can). One rule for
    :func:`build_optimizer` and the launcher's plan.

    * ``fsdp``: FSDP2 hands the optimizer DTensor parameters; NpuFusedAdamW flattens them with
      ``npu_combine_tensors`` and MegatronAdamW calls ``npu_apply_adam_w``, neither of which takes DTensors
      (torch_npu registers no DTensor sharding strategy for them); torch's foreach AdamW steps DTensors.
    * ``zero2`` / ``zero3``: DeepSpeed's ZeRO optimizer gives the wrapped optimizer flat fp32 partitions and
      assigns them new ``.grad`` tensors each step; NpuFusedAdamW combines gradient buffers once, at its first
      step (torch_npu optim/npu_fused_optim_base.py), and would step stale buffers from then on.
    * torch's *fused* AdamW is never used on NPU: torch_npu's GradScaler calls ``optimizer.step(grad_scaler=
      self)`` for optimizers with ``_step_supports_amp_scaling`` (torch_npu/npu/amp/grad_scaler.py), which
      torch's AdamW.step does not accept.
    """
    if engine == "fsdp" and name in ("fused_adamw", "megatron_adamw"):
        return "FSDP2's DTensor parameters cannot be combined or passed to torch_npu's AdamW kernels"
    if engine in ("zero2", "zero3") and name == "fused_adamw":
        return "ZeRO assigns new .grad tensors after NpuFusedAdamW combined the old ones at its first step"
    return None


def supports_sync_free_amp(optimizer) -> bool:
    """Whether ``GradScaler.step(optimizer)`` skips an overflowed step on the device, without reading
    ``found_inf`` on the host: true for torch's fused AdamW and MegatronAdamW's torch path. Pass the
    unwrapped optimizer to the scaler (accelerate's ``AcceleratedOptimizer`` does not forward the flag)."""
    return bool(getattr(_unwrap(optimizer), "_step_supports_amp_scaling", False))


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
) -> torch.Tensor:
    """Clip gradients to ``max_norm`` and return the total norm measured BEFORE clipping, as a 0-dim tensor
    on the gradients' device: reading it (``float()``) waits for the device, so callers keep it and read it
    when they log. torch's clip and accelerate's do not synchronise; torch_npu's fused clip does (it
    decides ``clip_coef < 1`` on the host).

    Gradients are always unscaled first when a loss scaler is in use:

    * ``accelerator`` given: for ordinary optimizers ``accelerator.clip_grad_norm_`` (it unscales through
      its GradScaler under fp16, and handles FSDP/DeepSpeed); for the NPU fused optimizer
      ``accelerator.unscale_gradients(optimizer)`` then ``clip_grad_norm_fused_``.
    * ``scaler`` given (a ``torch.amp.GradScaler``): ``scaler.unscale_(optimizer)`` first.

    If the gradients were already unscaled this step, that is detected and not done twice. With the
    fused optimizer the clip covers all of that optimizer's parameters (it works on its flat buffers).
    Under DeepSpeed accelerate returns no norm; then this returns a ``nan`` tensor.
    """
    if accelerator is not None and scaler is not None:
        raise ValueError("clip_grad_norm: pass either accelerator= or scaler=, not both.")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    inner = _unwrap(optimizer)
    fused_clip = getattr(inner, "clip_grad_norm_fused_", None)
    if callable(fused_clip) and any(_is_dtensor(p) for p in params):
        # The fused clip measures the tensors this rank holds: under sharding that is the local shard's norm,
        # not the global one torch's clip computes from DTensors.
        raise RuntimeError("clip_grad_norm: the fused clip measures only this rank's shard of sharded "
                           "(DTensor) parameters; build the optimizer with engine='fsdp'")

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
        return torch.full((), float("nan"))
    return norm if isinstance(norm, torch.Tensor) else torch.as_tensor(norm)


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
    "ENGINES",
    "OPTIMIZER_NAMES",
    "MegatronAdamW",
    "build_optimizer",
    "clip_grad_norm",
    "npu_engine_substitute",
    "optimizer_name_from_flags",
    "supports_sync_free_amp",
    "zero_grad",
]
