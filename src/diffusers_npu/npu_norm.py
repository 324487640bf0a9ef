"""Fused RMSNorm on Ascend NPUs for the diffusion transformers (issue #21 item 5).

diffusers offers an NPU RMSNorm: ``diffusers.models.normalization.RMSNorm`` calls
``torch_npu.npu_rms_norm(x, weight, epsilon=eps)`` when torch_npu is installed (SD3.5's q/k norms use it),
while FLUX's attention uses ``torch.nn.RMSNorm``, which has no NPU path. Two things keep us from relying on
diffusers' branch as it is:

* the kernel wants ``gamma`` in ``x``'s dtype ("数据类型需要和self保持一致", op-plugin
  ``torch_npu-npu_rms_norm.md``), but diffusers passes an fp32 weight with bf16/fp16 activations under
  autocast -- exactly the training setting (fp32 master weights, autocast compute);
* diffusers takes it whenever torch_npu is importable, whatever device the tensor is on.

:func:`use_fused_rms_norm` therefore replaces both kinds of module by :class:`FusedRMSNorm` (same ``weight``
parameter, so state dicts and checkpoints are unchanged), which calls the kernel through the device layer
(:func:`diffusers_npu.device.get_torch_npu`) for NPU tensors only, with ``gamma`` cast to the activation dtype,
and computes the reference RMSNorm elsewhere. Training (``build.module_and_speed``) and inference
(``inference.speed_up``) apply it on NPU runs only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import device as _device


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dimension with an optional weight: ``npu_rms_norm`` on NPU tensors."""

    def __init__(self, weight: Optional[nn.Parameter], eps: float, bias: Optional[nn.Parameter] = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and _device.tensor_device_type(x) == "npu":
            out = _device.get_torch_npu().npu_rms_norm(x, self.weight.to(x.dtype), epsilon=self.eps)[0]
        else:  # the reference: fp32 statistics, result in the input dtype (torch.nn.RMSNorm / diffusers')
            out = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
            if self.weight is not None:
                out = out * self.weight.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"eps={self.eps}, weight={self.weight is not None}"


def _fusable(module: nn.Module) -> Optional[FusedRMSNorm]:
    from diffusers.models.normalization import RMSNorm

    if isinstance(module, nn.RMSNorm):
        if len(module.normalized_shape) != 1:
            return None
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        return FusedRMSNorm(module.weight, eps)
    if isinstance(module, RMSNorm) and len(module.dim) == 1:
        return FusedRMSNorm(module.weight, module.eps, module.bias)
    return None


def use_fused_rms_norm(model: nn.Module) -> int:
    """Replace every one-dimensional ``torch.nn.RMSNorm`` / diffusers ``RMSNorm`` in ``model`` by
    :class:`FusedRMSNorm` (in place, parameters shared). Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = _fusable(child)
            if fused is not None:
                setattr(parent, name, fused)
                replaced += 1
    return replaced


__all__ = ["FusedRMSNorm", "use_fused_rms_norm"]
