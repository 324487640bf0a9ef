"""diffusers-npu: Stable Diffusion training and inference on Ascend NPU, CUDA and CPU.

The public names below are imported lazily, so ``import diffusers_npu`` stays fast and never imports
``torch_npu`` (or even diffusers) until something is actually used.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "detect_device": "diffusers_npu.device",
    "set_attention": "diffusers_npu.attention",
    "build_optimizer": "diffusers_npu.optim",
    "clip_grad_norm": "diffusers_npu.optim",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusers_npu' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
