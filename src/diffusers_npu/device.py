"""Device layer: the ONLY module of diffusers-npu that imports ``torch_npu``.

Everything device-specific the rest of the project needs goes through here, so that

* ``import diffusers_npu`` (and ``import diffusers_npu.device``) never imports ``torch_npu``: the Ascend
  extension patches torch on import, is slow to load and fails loudly on machines without CANN. It is
  imported lazily, once, by :func:`get_torch_npu`.
* this module depends on torch (and optionally numpy) only -- never on diffusers or anything above it.
* tests can pretend to be on an NPU by swapping two seams: ``sys.modules['torch_npu']`` (picked up by
  :func:`get_torch_npu` after :func:`_reset_torch_npu_cache`) and :func:`tensor_device_type`, which the
  attention processors and optimizers call to decide whether a tensor lives on an NPU. See
  ``tests/fake_torch_npu.py``.

Device arguments everywhere accept ``"npu"``, ``"cuda"``, ``"cpu"``, indexed forms such as ``"npu:1"``,
or a :class:`torch.device`.
"""
from __future__ import annotations

import os
import platform
import random
import sys
from typing import Optional, Union

import torch

ENV_VAR = "DIFFUSERS_NPU_DEVICE"
VALID_DEVICES = ("npu", "cuda", "cpu")

DeviceLike = Union[str, torch.device]

_UNSET = object()
# Cached result of the one import attempt of torch_npu: _UNSET (not tried yet), None (not importable) or
# the module. A failed import is cached too, because retrying costs seconds on every call.
_torch_npu_cache = _UNSET
_torch_npu_import_error: Optional[BaseException] = None


# --------------------------------------------------------------------------------------------- torch_npu
def get_torch_npu():
    """Return the ``torch_npu`` module, or ``None`` if it cannot be imported (result is cached)."""
    global _torch_npu_cache, _torch_npu_import_error
    if _torch_npu_cache is _UNSET:
        try:
            import torch_npu  # noqa: F401  (lazy on purpose; see module docstring)

            _torch_npu_cache = torch_npu
        except Exception as exc:  # ImportError, but also OSError/RuntimeError when CANN libs are missing
            _torch_npu_cache = None
            _torch_npu_import_error = exc
    return _torch_npu_cache


def _reset_torch_npu_cache() -> None:
    """Forget the cached import attempt (tests install a fake ``torch_npu`` and call this)."""
    global _torch_npu_cache, _torch_npu_import_error
    _torch_npu_cache = _UNSET
    _torch_npu_import_error = None


def _torch_npu_namespace():
    """``torch.npu`` (registered by importing torch_npu), or None."""
    if get_torch_npu() is None:
        return None
    return getattr(torch, "npu", None)


def is_npu_available() -> bool:
    """True if torch_npu imports AND reports at least one usable device.

    (diffusers' ``is_torch_npu_available()`` only checks the import, which is true on a CANN build box
    without cards.)
    """
    npu = _torch_npu_namespace()
    if npu is None:
        return False
    try:
        return bool(npu.is_available()) and int(npu.device_count()) > 0
    except Exception:
        return False


def _is_cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:
        return False


# ------------------------------------------------------------------------------------------- detection
def device_type(device: DeviceLike) -> str:
    """Normalise ``"npu:1"`` / ``torch.device("cuda", 0)`` / ``"CPU"`` to the bare type string."""
    if isinstance(device, torch.device):
        return device.type
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    return device.strip().lower().split(":", 1)[0]


def _device_index(device: DeviceLike) -> Optional[int]:
    if isinstance(device, torch.device):
        return device.index
    parts = str(device).split(":", 1)
    if len(parts) == 2 and parts[1].strip():
        try:
            return int(parts[1])
        except ValueError:
            raise ValueError(f"Bad device index in {device!r}") from None
    return None


def tensor_device_type(tensor: torch.Tensor) -> str:
    """Device type of a tensor (``"npu"``, ``"cuda"``, ``"cpu"`` ...).

    Attention processors and optimizers call this -- through the module, ``device.tensor_device_type(t)``
    -- instead of reading ``t.device.type`` themselves. It is the single seam the test-suite monkeypatches
    to run the NPU code paths on CPU tensors against a recording stand-in for torch_npu.
    """
    return tensor.device.type


def detect_device(override: Optional[str] = None) -> str:
    """Pick the device type to run on: ``"npu"``, ``"cuda"`` or ``"cpu"``.

    Order: the explicit ``override`` argument, else the ``DIFFUSERS_NPU_DEVICE`` environment variable,
    else an NPU if torch_npu imports and a device is present, else CUDA if available, else CPU.
    ``"auto"`` (or an empty value) means "detect". Indexed forms (``"npu:1"``) are accepted and reduced
    to the type; choosing the index is the launcher's job.

    Raises:
        ValueError: the requested device is not one of npu/cuda/cpu/auto.
        RuntimeError: npu or cuda was requested explicitly but is not available.
    """
    source = None
    choice = override
    if choice is not None and str(choice).strip():
        source = "the device argument"
    else:
        env = os.environ.get(ENV_VAR, "")
        if env.strip():
            choice, source = env, f"the {ENV_VAR} environment variable"

    if source is not None:
        kind = device_type(str(choice))
        if kind != "auto":
            if kind not in VALID_DEVICES:
                raise ValueError(
                    f"Unknown device {choice!r} (from {source}); expected one of "
                    f"{', '.join(repr(d) for d in VALID_DEVICES)} or 'auto'."
                )
            if kind == "npu" and not is_npu_available():
                why = (
                    f"torch_npu cannot be imported ({_torch_npu_import_error!r})"
                    if get_torch_npu() is None
                    else "torch.npu reports no available device"
                )
                raise RuntimeError(f"Device 'npu' was requested via {source}, but no Ascend NPU is available: {why}.")
            if kind == "cuda" and not _is_cuda_available():
                raise RuntimeError(
                    f"Device 'cuda' was requested via {source}, but torch.cuda.is_available() is False "
                    f"(torch {torch.__version__})."
                )
            return kind

    if is_npu_available():
        return "npu"
    if _is_cuda_available():
        return "cuda"
    return "cpu"


def amp_device_type(device: DeviceLike) -> str:
    """The ``device_type`` string for :class:`torch.autocast` (accelerate autocasts on "npu" too)."""
    kind = device_type(device)
    return kind if kind in VALID_DEVICES else "cpu"


# ------------------------------------------------------------------------------------------- settings
def apply_device_settings(device: DeviceLike, jit_compile: bool = False, allow_tf32: bool = False) -> dict:
    """Apply the per-device runtime settings the project relies on. Returns what was set (for logs).

    * NPU: ``torch.npu.config.allow_internal_format = False`` (keep ND layouts, so tensors saved and
      reloaded behave like on other devices) and ``torch_npu.npu.set_compile_mode(jit_compile=...)`` --
      the settings upstream diffusers' NPU example scripts apply. JIT compile off uses precompiled
      binary kernels, which avoids per-shape compilation stalls.
    * CUDA: TF32 matmuls only if ``allow_tf32=True`` (it changes numerics, so it is opt-in).
    * CPU: nothing.
    """
    kind = device_type(device)
    applied: dict = {}
    if kind == "npu":
        torch_npu = get_torch_npu()
        if torch_npu is None:
            raise RuntimeError("apply_device_settings('npu') needs torch_npu, which cannot be imported.")
        torch.npu.config.allow_internal_format = False
        torch_npu.npu.set_compile_mode(jit_compile=jit_compile)
        applied = {"allow_internal_format": False, "jit_compile": bool(jit_compile)}
    elif kind == "cuda":
        if allow_tf32:
            # "high" = TF32 for fp32 matmuls; the stable public switch (the allow_tf32 flags are legacy).
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
            applied = {"float32_matmul_precision": "high", "cudnn_allow_tf32": True}
    elif kind != "cpu":
        raise ValueError(f"Unknown device {device!r}; expected one of {VALID_DEVICES}.")
    return applied


def synchronize(device: DeviceLike) -> None:
    """Wait for queued kernels (for honest timings). No-op on CPU."""
    kind = device_type(device)
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "npu":
        _require_npu_namespace("synchronize").synchronize()


def empty_cache(device: DeviceLike) -> None:
    """Release cached allocator blocks back to the driver. No-op on CPU."""
    kind = device_type(device)
    if kind == "cuda":
        torch.cuda.empty_cache()
    elif kind == "npu":
        _require_npu_namespace("empty_cache").empty_cache()


def seed_everything(seed: int) -> int:
    """Seed python ``random``, numpy (if installed), torch, and every CUDA / NPU device present."""
    seed = int(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))  # numpy's legacy seeder only takes 32-bit seeds
    except ImportError:
        pass
    torch.manual_seed(seed)
    if _is_cuda_available():
        torch.cuda.manual_seed_all(seed)
    # Only touch torch_npu if it is already imported or actually usable, so that seeding on a CUDA/CPU
    # box never triggers a slow torch_npu import attempt it did not need.
    if sys.modules.get("torch_npu") is not None or _torch_npu_cache not in (_UNSET, None):
        if is_npu_available():
            torch.npu.manual_seed_all(seed)
    return seed


def device_name(device: DeviceLike) -> str:
    """Human-readable device description for logs and summaries."""
    kind = device_type(device)
    index = _device_index(device)
    if kind == "cuda":
        return torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())
    if kind == "npu":
        npu = _require_npu_namespace("device_name")
        return str(npu.get_device_name(index if index is not None else npu.current_device()))
    if kind == "cpu":
        return f"cpu ({platform.machine() or 'unknown'}, {torch.get_num_threads()} threads)"
    raise ValueError(f"Unknown device {device!r}; expected one of {VALID_DEVICES}.")


def peak_memory_bytes(device: DeviceLike) -> int:
    """Peak memory in bytes.

    CUDA / NPU: peak bytes allocated by torch's caching allocator since the last
    :func:`reset_peak_memory`. CPU: the process's peak resident set size (``ru_maxrss``, whole process,
    cannot be reset; 0 where the ``resource`` module is unavailable, e.g. Windows).
    """
    kind = device_type(device)
    if kind == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if kind == "npu":
        return int(_require_npu_namespace("peak_memory_bytes").max_memory_allocated())
    try:
        import resource
    except ImportError:
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_memory(device: DeviceLike) -> None:
    """Reset the allocator's peak counter (CUDA / NPU). No-op on CPU (ru_maxrss cannot be reset)."""
    kind = device_type(device)
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif kind == "npu":
        _require_npu_namespace("reset_peak_memory").reset_peak_memory_stats()


def supports_bf16(device: DeviceLike) -> bool:
    """Whether bf16 compute is supported (first-generation Ascend 910 and pre-Ampere GPUs lack it)."""
    kind = device_type(device)
    if kind == "cpu":
        return True
    if kind == "cuda":
        return _is_cuda_available() and bool(torch.cuda.is_bf16_supported())
    if kind == "npu":
        npu = _torch_npu_namespace()
        check = getattr(npu, "is_bf16_supported", None) if npu is not None else None
        # Conservative: if this torch_npu build cannot tell us, assume no bf16.
        return bool(check()) if callable(check) else False
    return False


def _require_npu_namespace(what: str):
    npu = _torch_npu_namespace()
    if npu is None:
        raise RuntimeError(f"{what}('npu') needs torch_npu, which cannot be imported.")
    return npu


__all__ = [
    "ENV_VAR",
    "VALID_DEVICES",
    "amp_device_type",
    "apply_device_settings",
    "detect_device",
    "device_name",
    "device_type",
    "empty_cache",
    "get_torch_npu",
    "is_npu_available",
    "peak_memory_bytes",
    "reset_peak_memory",
    "seed_everything",
    "supports_bf16",
    "synchronize",
    "tensor_device_type",
]
