"""THE inference speed-up: one function, used by ``diffusers-npu generate``, the ``test_infer`` scripts and
``bench/infer_throughput.py`` (so the benchmark measures what users run).

:func:`speed_up` applies, in place and in this order:

1. **attention** -- :func:`diffusers_npu.attention.set_attention` on every component with diffusers
   ``Attention`` modules (UNet, VAE, ControlNet, ...). ``auto`` is the fused kernel on NPU (fp16/bf16) and
   CUDA, fp32-softmax for half precision elsewhere, stock SDPA for fp32 on CPU.
2. **channels_last** (:func:`channels_last_policy`) -- the UNet, VAE and ControlNet in NHWC memory format.
   Default: on for CUDA (cuDNN's convolutions are fastest in NHWC in half precision) and whenever the UNet is
   compiled; off on CPU and NPU (Ascend uses its own internal formats; on CPU it measured no faster).
3. **compile** (:func:`compile_options`) -- ``torch.compile`` of the UNet or the SD3 / FLUX transformer (and
   the ControlNet), only when asked:
   on CUDA ``max-autotune`` (Triton autotuning plus CUDA graphs; the first image pays minutes of compile);
   on CPU the default mode, with a warning that the warm-up is long; on NPU it is skipped with a warning
   (inductor has no Ascend backend; graph mode there needs torchair). Shapes are fixed within a run, so
   ``dynamic=False``.
"""
from __future__ import annotations

import sys
from typing import List, Optional

COMPILED_COMPONENTS = ("unet", "transformer", "controlnet")
CHANNELS_LAST_COMPONENTS = ("unet", "vae", "controlnet")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def channels_last_policy(device: str, compile: bool) -> bool:
    """Whether :func:`speed_up` uses channels_last by default (see the module docstring)."""
    return device == "cuda" or (compile and device != "npu")


def compile_options(device: str, mode: Optional[str] = None) -> Optional[dict]:
    """``torch.compile`` keyword arguments for ``device`` (None: do not compile there)."""
    if device == "npu":
        return None
    if mode is None:
        mode = "max-autotune" if device == "cuda" else None
    options = {"dynamic": False}
    if mode:
        options["mode"] = mode
    return options


def _has_diffusers_attention(module) -> bool:
    """diffusers ``Attention`` (UNets, VAEs, SD3) or dispatching attention modules (FLUX)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return any(isinstance(m, (Attention, AttentionModuleMixin)) for m in module.modules())


def speed_up(pipe, device: str, attention: str = "auto", channels_last: Optional[bool] = None,
             compile: bool = False, compile_mode: Optional[str] = None, quiet: bool = False) -> List[str]:
    """Apply the speed-ups to ``pipe`` in place (see the module docstring). Returns what was done, e.g.
    ``["attention=auto", "channels_last", "torch.compile(mode=max-autotune)"]``.

    ``channels_last`` None: :func:`channels_last_policy`. ``compile_mode`` None: the device's default.
    ``quiet`` suppresses the warnings about compile warm-up (the benchmark reports its warm-up itself).
    """
    import torch

    from ..attention import set_attention
    from ..npu_norm import use_fused_rms_norm

    done = [f"attention={attention}"]
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and _has_diffusers_attention(component):
            set_attention(component, attention)
            if device == "npu" and use_fused_rms_norm(component):  # the transformers' q/k norms
                done.append(f"fused RMSNorm ({type(component).__name__})")

    if channels_last is None:
        channels_last = channels_last_policy(device, compile)
    if channels_last:
        for name in CHANNELS_LAST_COMPONENTS:
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
        done.append("channels_last")

    if compile:
        options = compile_options(device, compile_mode)
        targets = [n for n in COMPILED_COMPONENTS if isinstance(getattr(pipe, n, None), torch.nn.Module)]
        if options is None:
            _warn("--compile is ignored on npu (torch.compile/inductor has no Ascend backend; use torchair)")
        elif not targets:
            _warn(f"--compile: {type(pipe).__name__} has no unet or transformer; running eager")
        else:
            if not quiet and device == "cuda":
                _warn("--compile on cuda: the first image includes max-autotune compilation (minutes, even for "
                      "small models); later images are faster")
            elif not quiet:
                _warn("--compile on cpu is slow to warm up: the first image includes minutes of compilation, "
                      "and the speed-up is small")
            for name in targets:
                setattr(pipe, name, torch.compile(getattr(pipe, name), **options))
            done.append(f"torch.compile(mode={options.get('mode', 'default')})")
    return done


__all__ = ["channels_last_policy", "compile_options", "speed_up"]
