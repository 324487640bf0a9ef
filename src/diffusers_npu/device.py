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
import re
import statistics
import sys
import time
from typing import Optional, Tuple, Union

import torch

ENV_VAR = "DIFFUSERS_NPU_DEVICE"
VALID_DEVICES = ("npu", "cuda", "cpu")

DeviceLike = Union[str, torch.device]

_UNSET = object()
# Cached result of the one import attempt of torch_npu: _UNSET (not tried yet), None (not importable) or
# the module. A failed import is cached too, because retrying costs seconds on every call.
_torch_npu_cache = _UNSET
_torch_npu_import_error: Optional[BaseException] = None
# Facts about the NPU that cannot change within a process (SoC name, fusion-attention support), asked once:
# the attention processors consult them on every call. Cleared together with the torch_npu cache.
_npu_facts: dict = {}


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
    _npu_facts.clear()


def _torch_npu_namespace():
    """``torch.npu`` (registered by importing torch_npu), or None."""
    if get_torch_npu() is None:
        return None
    return getattr(torch, "npu", None)


def is_npu_available() -> bool:
    """True if torch_npu imports AND reports a device (diffusers' check is only the import)."""
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
    """Device type of a tensor. Attention processors and optimizers call this (through the module) instead
    of reading ``t.device.type``: the one seam tests patch to run NPU code paths on CPU tensors."""
    return tensor.device.type


def detect_device(override: Optional[str] = None) -> str:
    """Pick the device type to run on: ``"npu"``, ``"cuda"`` or ``"cpu"``.

    Order: ``override``, else ``$DIFFUSERS_NPU_DEVICE``, else an NPU if usable, else CUDA, else CPU. ``"auto"``
    or empty means detect; ``"npu:1"`` is reduced to the type. ValueError for an unknown device,
    RuntimeError when npu/cuda is requested but unavailable.
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
    """Peak bytes: CUDA / NPU allocator peak since :func:`reset_peak_memory`; CPU: the process's peak RSS
    (``ru_maxrss``, cannot be reset; 0 where ``resource`` is missing, e.g. Windows)."""
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


#: the attention backend of diffusers' dispatching attention (FLUX's processors): ``native`` (SDPA, the default)
#: or ``_native_npu`` (diffusers' npu_fusion_attention backend), for measuring one against the other on an NPU
DIT_ATTENTION_ENV = "DIFFUSERS_NPU_DIT_ATTENTION"
DIT_ATTENTION_BACKENDS = ("native", "_native_npu")


def dit_attention_backend(context_parallel: bool = False) -> str:
    """The diffusers attention backend for the transformer models' dispatching attention.

    ``native`` (torch SDPA) everywhere by default: torch_npu registers its fused attention behind SDPA, CUDA
    picks flash / memory-efficient kernels. ``$DIFFUSERS_NPU_DIT_ATTENTION=_native_npu`` selects diffusers'
    own NPU backend on NPU devices, never with context parallelism: its context-parallel path has no
    backward (``_npu_attention_backward_op`` raises NotImplementedError in diffusers 0.42)."""
    requested = os.environ.get(DIT_ATTENTION_ENV, "").strip() or "native"
    if requested not in DIT_ATTENTION_BACKENDS:
        raise ValueError(f"{DIT_ATTENTION_ENV}={requested!r}: expected one of {', '.join(DIT_ATTENTION_BACKENDS)}")
    if requested == "_native_npu":
        if not is_npu_available():
            raise ValueError(f"{DIT_ATTENTION_ENV}=_native_npu needs an NPU (torch_npu and a device)")
        if context_parallel:
            raise ValueError(f"{DIT_ATTENTION_ENV}=_native_npu cannot train with context parallelism: diffusers' "
                             "NPU attention has no backward for it; use the default (SDPA)")
    return requested


#: declares the memory of one device in GB (10^9 bytes), e.g. to check a plan for a 64 GB NPU from a CPU machine
DEVICE_MEMORY_ENV = "DIFFUSERS_NPU_DEVICE_MEMORY_GB"


def device_memory_bytes(device: DeviceLike) -> Optional[int]:
    """Total memory of one device: ``$DIFFUSERS_NPU_DEVICE_MEMORY_GB`` when set, else the CUDA / NPU device's
    ``total_memory`` (``get_device_properties``; torch_npu offers the same call as CUDA). None on CPU, whose RAM
    the processes share with everything else on the machine (callers then do not refuse a plan)."""
    declared = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    if declared:
        try:
            gb = float(declared)
        except ValueError:
            raise ValueError(f"{DEVICE_MEMORY_ENV}={declared!r}: expected a number of GB") from None
        if gb <= 0:
            raise ValueError(f"{DEVICE_MEMORY_ENV}={declared!r}: expected a positive number of GB")
        return int(gb * 1e9)
    kind = device_type(device)
    index = _device_index(device)
    if kind == "cuda":
        return int(torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
                   .total_memory)
    if kind == "npu":
        npu = _require_npu_namespace("device_memory_bytes")
        return int(npu.get_device_properties(index if index is not None else npu.current_device()).total_memory)
    return None


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


# ------------------------------------------------------------------------------------ NPU identity
# torch_npu's SocVersion numbers (enum c10_npu::SocVersion in torch_npu/csrc/core/npu/NpuVariables.h):
# 100-104 first-generation 910 ("Atlas training series"), 200-205 310P, 220-225 910B ("Atlas A2"),
# 240-243 310B, 250-255 910_93 ("Atlas A3"), 260 Ascend950 (named Ascend910_95 in older releases).
_SOC_NAMES = {
    100: "Ascend910PremiumA", 101: "Ascend910ProA", 102: "Ascend910A", 103: "Ascend910ProB", 104: "Ascend910B",
    200: "Ascend310P1", 201: "Ascend310P2", 202: "Ascend310P3", 203: "Ascend310P4", 204: "Ascend310P5",
    205: "Ascend310P7", 220: "Ascend910B1", 221: "Ascend910B2", 222: "Ascend910B2C", 223: "Ascend910B3",
    224: "Ascend910B4", 225: "Ascend910B4-1", 240: "Ascend310B1", 241: "Ascend310B2", 242: "Ascend310B3",
    243: "Ascend310B4", 250: "Ascend910_9391", 251: "Ascend910_9392", 252: "Ascend910_9381",
    253: "Ascend910_9382", 254: "Ascend910_9372", 255: "Ascend910_9362", 260: "Ascend950",
}
# SoCs whose fusion-attention kernel (aclnnFlashAttentionScore, behind torch_npu.npu_fusion_attention) is
# documented: torch_npu's API page lists "Atlas A2 训练系列产品" (910B1..910B4-1) only
# (Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-npu_fusion_attention.md); CANN's kernel page
# adds Atlas A3 (910_93xx) and marks 950PR/950DT unsupported (cann/ops-transformer
# attention/flash_attention_score/docs/aclnnFlashAttentionScore.md); CANN 7.0's aclnn page says the first
# generation ("Atlas 训练系列产品", 910/910A) is not supported. "Ascend910B" alone (104) is first generation.
_FUSION_ATTENTION_SOC = re.compile(r"^Ascend910B\d|^Ascend910_93\d\d")
FUSION_ATTENTION_ENV = "DIFFUSERS_NPU_FUSION_ATTENTION"  # "1"/"0" overrides the SoC table (e.g. for a new SoC)


def npu_soc_name() -> Optional[str]:
    """This machine's Ascend SoC (e.g. ``"Ascend910B2"``), or None without torch_npu. Asked once: from
    ``torch_npu.npu.get_soc_version()`` through the table above, else the device name (CANN reports the SoC)."""
    if "soc" not in _npu_facts:
        name = None
        npu = _torch_npu_namespace()
        if npu is not None:
            version = None
            try:
                version = int(npu.get_soc_version())
            except Exception:  # older torch_npu without the call, or no device
                pass
            name = _SOC_NAMES.get(version)
            if name is None:
                try:
                    name = str(npu.get_device_name(0)).strip() or None
                except Exception:
                    name = f"SoC version {version}" if version is not None else None
        _npu_facts["soc"] = name
    return _npu_facts["soc"]


def npu_supports_fusion_attention() -> bool:
    """Whether ``torch_npu.npu_fusion_attention`` runs on this SoC (``_FUSION_ATTENTION_SOC``); False without
    torch_npu. ``DIFFUSERS_NPU_FUSION_ATTENTION=1`` / ``=0`` overrides the table."""
    env = os.environ.get(FUSION_ATTENTION_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if "fusion_attention" not in _npu_facts:
        soc = npu_soc_name()
        _npu_facts["fusion_attention"] = bool(soc and _FUSION_ATTENTION_SOC.match(soc))
    return _npu_facts["fusion_attention"]


def npu_status() -> Tuple[bool, str]:
    """``(usable, reason)``: whether an Ascend NPU can be used, and one line why (not) -- so the launcher and
    the trainer can say loudly why a machine with torch_npu installed would train on the CPU."""
    torch_npu = get_torch_npu()
    if torch_npu is None:
        err = _torch_npu_import_error
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "torch_npu":
            return False, "torch_npu is not installed"
        return False, (f"torch_npu is installed but cannot be imported ({type(err).__name__}: {err}); "
                       f"is CANN's set_env.sh sourced (test/env_npu.sh does it)?")
    npu = _torch_npu_namespace()
    try:
        available, count = bool(npu.is_available()), int(npu.device_count())
    except Exception as exc:
        return False, f"torch_npu imports but the NPU runtime fails: {type(exc).__name__}: {exc}"
    if not available or count < 1:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        shown = f"; ASCEND_RT_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        return False, (f"torch_npu imports but reports no usable NPU (is_available()={available}, "
                       f"device_count()={count}{shown}): driver not loaded, no device mapped into this "
                       f"container, or the devices are held by another process (npu-smi info shows which)")
    soc = npu_soc_name() or "unknown SoC"
    return True, f"{count} NPU(s) usable ({soc})"


# ------------------------------------------------------------------------------------ loss scaling
def make_grad_scaler(device: DeviceLike, enabled: bool = True, sharded: bool = False, **kwargs):
    """The fp16 loss scaler for ``device`` (``kwargs``: init_scale, growth_interval, ...).

    * NPU: torch_npu's own ``torch.npu.amp.GradScaler`` (sharded: torch_npu's ``ShardedGradScaler``). Unlike
      ``torch.amp.GradScaler("npu")`` it clears the float-status overflow flag on SoCs without inf/nan
      support (910A saturation mode), all-reduces the overflow decision across ranks, and unscales
      NpuFusedAdamW's combined gradient buffer in one call (torch_npu/npu/amp/grad_scaler.py). It reads the
      overflow flag on the host every step (``.item()``): the NPU fp16 step synchronises.
    * CUDA / CPU: ``torch.amp.GradScaler(device_type)``; sharded (FSDP): torch's ``ShardedGradScaler``.

    Needs torch >= 2.3 for CPU (the first release with a CPU GradScaler); CUDA and NPU work from 2.1.
    """
    kind = device_type(device)
    if kind == "npu":
        npu = _require_npu_namespace("make_grad_scaler")
        if sharded:
            import importlib

            try:
                cls = importlib.import_module("torch_npu.npu.amp.sharded_grad_scaler").ShardedGradScaler
            except (ImportError, AttributeError):
                cls = None
            if cls is not None:
                return cls(enabled=enabled, **kwargs)
        else:
            cls = getattr(getattr(npu, "amp", None), "GradScaler", None)
            if cls is not None:
                return cls(enabled=enabled, **kwargs)  # takes no device argument: it is NPU-only
    elif kind not in ("cuda", "cpu"):
        raise ValueError(f"Unknown device {device!r}; expected one of {VALID_DEVICES}.")
    if sharded:
        import inspect

        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        if "device" in inspect.signature(ShardedGradScaler.__init__).parameters:  # torch >= 2.2
            kwargs["device"] = kind
        return ShardedGradScaler(enabled=enabled, **kwargs)
    amp_scaler = getattr(torch.amp, "GradScaler", None)
    if amp_scaler is not None:
        return amp_scaler(kind, enabled=enabled, **kwargs)
    if kind == "cuda":  # torch 2.1 / 2.2
        return torch.cuda.amp.GradScaler(enabled=enabled, **kwargs)
    from .errors import UsageError

    raise UsageError(f"fp16 loss scaling on {kind} needs torch >= 2.3 (installed: {torch.__version__}); "
                     f"use --mixed_precision bf16 or no")


# ------------------------------------------------------------------------------------- CPU threads
_PROBE_MIN_SPEEDUP = 1.25  # more threads must be clearly faster: on busy cores they were 3x slower, not 1.6x faster


def available_cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _thread_probe(threads: int, budget_s: float = 0.1) -> float:
    """How much faster ``threads`` threads run a UNet-like convolution than 1 (ratio of medians). The two
    settings alternate, so load that comes and goes during the probe hits both alike."""
    old = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 128, 8, 8, generator=gen)
    w = torch.randn(128, 128, 3, 3, generator=gen)
    times = {1: [], threads: []}
    try:
        with torch.no_grad():
            for n in (threads, 1):  # warm-up: builds the thread pool and picks the kernels
                torch.set_num_threads(n)
                torch.nn.functional.conv2d(x, w, padding=1)
            end = time.perf_counter() + budget_s
            while time.perf_counter() < end or len(times[1]) < 3:
                for n in (1, threads):
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    torch.nn.functional.conv2d(x, w, padding=1)
                    times[n].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return statistics.median(times[1]) / max(statistics.median(times[threads]), 1e-9)


def configure_cpu_threads(local_world_size: int = 1) -> Tuple[int, str]:
    """Choose and set torch's CPU thread count; returns ``(threads, one-line reason for the log)``.

    ``OMP_NUM_THREADS`` wins when set. Otherwise each of the ``local_world_size`` processes on this machine
    gets its share of the cores, and uses all of its share only if a 0.1 s probe shows that to be clearly
    faster than one thread. Measured on a 2-core machine with the embedded default step (batch 64): idle,
    2 threads 114 img/s against 70 for 1; with the other core busy, 2 threads 20 img/s against 68 for 1.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            threads = int(env.split(",")[0])  # OMP allows a per-nesting-level list: "4,2"
            if threads < 1:
                raise ValueError
        except ValueError:
            from .errors import UsageError

            raise UsageError(f"OMP_NUM_THREADS={env!r} is not a positive whole number of threads") from None
        torch.set_num_threads(threads)
        return threads, f"CPU threads: {threads} per process (OMP_NUM_THREADS={env})"
    cores = available_cpu_cores()
    procs = max(1, int(local_world_size))
    share = max(1, cores // procs)
    if share == 1:
        torch.set_num_threads(1)
        return 1, f"CPU threads: 1 per process ({cores} core(s) for {procs} process(es) on this machine)"
    speedup = _thread_probe(share)
    if speedup >= _PROBE_MIN_SPEEDUP:
        threads, why = share, f"a probe ran {share} threads {speedup:.1f}x as fast as 1"
    else:
        threads, why = 1, (f"a probe ran {share} threads only {speedup:.2f}x as fast as 1: the cores look busy; "
                           f"set OMP_NUM_THREADS to choose")
    torch.set_num_threads(threads)
    return threads, f"CPU threads: {threads} per process ({why})"


def _require_npu_namespace(what: str):
    npu = _torch_npu_namespace()
    if npu is None:
        raise RuntimeError(f"{what}('npu') needs torch_npu, which cannot be imported.")
    return npu


__all__ = [
    "ENV_VAR", "FUSION_ATTENTION_ENV", "VALID_DEVICES", "amp_device_type", "apply_device_settings",
    "DEVICE_MEMORY_ENV", "DIT_ATTENTION_ENV", "available_cpu_cores", "dit_attention_backend", "configure_cpu_threads", "detect_device", "device_memory_bytes",
    "device_name", "device_type",
    "empty_cache", "get_torch_npu", "is_npu_available", "make_grad_scaler", "npu_soc_name", "npu_status",
    "npu_supports_fusion_attention", "peak_memory_bytes", "reset_peak_memory", "seed_everything",
    "supports_bf16", "synchronize", "tensor_device_type"
]
