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
import sys
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
KEEP_FP32_PRECISION_MODE = "must_keep_origin_dtype"

def apply_device_settings(device: DeviceLike, jit_compile: bool = False, allow_tf32: bool = False) -> dict:
    """Apply the per-device runtime settings the project relies on. Returns what was set (for logs).

    * NPU: ``torch.npu.config.allow_internal_format = False`` (keep ND layouts, so tensors saved and
      reloaded behave like on other devices) and ``torch_npu.npu.set_compile_mode(jit_compile=...)`` --
      the settings upstream diffusers' NPU example scripts apply. JIT compile off uses precompiled
      binary kernels, which avoids per-shape compilation stalls. And ``ACL_PRECISION_MODE =
      must_keep_origin_dtype`` through ``torch.npu.set_option``: below Ascend910B1 torch_npu's default is
      ``allow_fp32_to_fp16`` (LazyInitAclops.cpp SetPrecisionMode; EnvVariables.cpp IsAllowFP32ToFP16 feeds
      the aclnn cube math type), i.e. "fp32" matmuls and convolutions run in fp16 -- without a loss scaler.
      Where the default already keeps fp32 (910B1 and later) nothing is set.
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
        soc = npu_soc_version()
        if soc is None or soc < SOC_910B1:
            # The option torch_npu reads at its lazy ACL initialisation and for every aclnn matmul/conv
            # (npu_config.py _option_map lists the two values).
            torch.npu.set_option({"ACL_PRECISION_MODE": KEEP_FP32_PRECISION_MODE})
            applied["ACL_PRECISION_MODE"] = KEEP_FP32_PRECISION_MODE
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
# 240-243 310B, 250-256 910_93 ("Atlas A3"), 260 Ascend950 (named Ascend910_95 in older releases).
_SOC_NAMES = {
    100: "Ascend910PremiumA", 101: "Ascend910ProA", 102: "Ascend910A", 103: "Ascend910ProB", 104: "Ascend910B",
    200: "Ascend310P1", 201: "Ascend310P2", 202: "Ascend310P3", 203: "Ascend310P4", 204: "Ascend310P5",
    205: "Ascend310P7", 220: "Ascend910B1", 221: "Ascend910B2", 222: "Ascend910B2C", 223: "Ascend910B3",
    224: "Ascend910B4", 225: "Ascend910B4-1", 240: "Ascend310B1", 241: "Ascend310B2", 242: "Ascend310B3",
    243: "Ascend310B4", 250: "Ascend910_9391", 251: "Ascend910_9392", 252: "Ascend910_9381",
    253: "Ascend910_9382", 254: "Ascend910_9372", 255: "Ascend910_9362", 256: "Ascend910_9363", 260: "Ascend950",
}
_SOC_BY_NAME = {name: number for number, name in _SOC_NAMES.items()}
# torch_npu compares SocVersion numbers, never names: "GetSocVersion() >= SocVersion::Ascend910B1" gates its
# SDPA fusion (op-plugin ScaledDotProductAttentionKernelNpuOpApi.cpp) and its fp32 precision default
# (torch_npu LazyInitAclops.cpp SetPrecisionMode); "< Ascend950" picks the kernel generation. So do we.
SOC_910B1, SOC_950 = 220, 260
# npu_fusion_attention itself (aclnnFlashAttentionScore): Atlas A2 (220-225) and A3 (250-256) in every
# release that has it (torch_npu-npu_fusion_attention.md; CANN aclnnFlashAttentionScore.md); the 950 from
# op-plugin 26.0.0 on (its 950 branch calls aclnnFlashAttentionScoreV4, FlashAttentionKernelNpuOpApi.cpp);
# not the first-generation 910 ("Atlas 训练系列产品不支持该算子") nor the 310 inference parts.
_FUSION_KERNEL_SOCS = set(range(220, 226)) | set(range(250, 257))
FUSION_ATTENTION_ENV = "DIFFUSERS_NPU_FUSION_ATTENTION"  # "1"/"0" overrides the SoC table (e.g. for a new SoC)

# torch_npu package version -> the first Ascend Extension for PyTorch release with a feature. Each entry
# is (table of {torch base version: first .postN with it}, first torch base version where every build has
# it); from Ascend/pytorch COMPATIBILITY.md (package version <-> branch v<torch>-<release>):
#   6.0.rc2: 2.1.0.post6, 2.2.0.post2, 2.3.1  -> torch_npu's SDPA dispatches to npu_fusion_attention on
#            SoC >= Ascend910B1 for fp16/bf16/fp32, bool or no mask (op-plugin v2r1 SDPA kernel, 6.0.rc2)
#   26.0.0:  2.7.1.post4, 2.8.0.post4, 2.9.0.post2, 2.10.0 -> Ascend950 in SDPA and npu_fusion_attention
#   26.1.0:  2.7.1.post8, 2.9.0.post6, 2.10.0.post4, 2.11.0 -> SDPA passes inner_precise=2 with a mask and
#            broadcasts [B,1,1,S]-style masks itself (op-plugin 9f593387, calculate_inner_precise_for_fa)
_RELEASE_6_0_RC2 = ({(2, 1, 0): 6, (2, 2, 0): 2, (2, 3, 1): 0}, (2, 4, 0))
_RELEASE_26_0_0 = ({(2, 7, 1): 4, (2, 8, 0): 4, (2, 9, 0): 2}, (2, 10, 0))
_RELEASE_26_1_0 = ({(2, 7, 1): 8, (2, 9, 0): 6, (2, 10, 0): 4}, (2, 11, 0))


def _torch_npu_has(release, version: Optional[str]) -> bool:
    """Whether torch_npu ``version`` (e.g. "2.1.0.post8", "2.10.0+gitabc") is of ``release`` or later."""
    match = re.match(r"\s*(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", str(version or ""))
    if not match:
        return False
    base, post = tuple(int(x) for x in match.groups()[:3]), int(match.group(4) or 0)
    table, every_build_from = release
    if base >= every_build_from:
        return True
    return base in table and post >= table[base]


def npu_soc_version() -> Optional[int]:
    """torch_npu's SocVersion number of this machine's NPU, or None (no torch_npu, or it cannot say)."""
    if "soc_version" not in _npu_facts:
        number = None
        npu = _torch_npu_namespace()
        if npu is not None:
            try:
                number = int(npu.get_soc_version())
            except Exception:  # older torch_npu without the call, or no device: read the device name instead
                try:
                    number = _SOC_BY_NAME.get(str(npu.get_device_name(0)).strip())
                except Exception:
                    number = None
        _npu_facts["soc_version"] = number
    return _npu_facts["soc_version"]


def npu_soc_name() -> Optional[str]:
    """This machine's Ascend SoC (e.g. ``"Ascend910B2"``), or None without torch_npu. Asked once: from
    ``torch_npu.npu.get_soc_version()`` through the table above, else the device name (CANN reports the SoC)."""
    if "soc" not in _npu_facts:
        number = npu_soc_version()
        name = _SOC_NAMES.get(number) if number is not None else None
        if name is None and _torch_npu_namespace() is not None:
            try:
                name = str(torch.npu.get_device_name(0)).strip() or None
            except Exception:
                name = f"SoC version {number}" if number is not None else None
        _npu_facts["soc"] = name
    return _npu_facts["soc"]


def torch_npu_version() -> Optional[str]:
    torch_npu = get_torch_npu()
    return None if torch_npu is None else str(getattr(torch_npu, "__version__", "") or "") or None


def npu_supports_fusion_attention() -> bool:
    """Whether the explicit ``torch_npu.npu_fusion_attention`` kernel runs on this SoC with this torch_npu
    (``_FUSION_KERNEL_SOCS``; the 950 from release 26.0.0); False without torch_npu.
    ``DIFFUSERS_NPU_FUSION_ATTENTION=1`` / ``=0`` overrides the table."""
    env = os.environ.get(FUSION_ATTENTION_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    soc = npu_soc_version()
    if soc is None:
        return False
    if soc == SOC_950:
        return _torch_npu_has(_RELEASE_26_0_0, torch_npu_version())
    return soc in _FUSION_KERNEL_SOCS  # a SoC unknown to this table: no (the variable above overrides)


def npu_sdpa_is_fused() -> bool:
    """Whether torch_npu's own ``scaled_dot_product_attention`` runs the fusion kernel here (for fp16/bf16/fp32
    BNSD inputs with a bool or no mask, head dim <= 512): SoC >= Ascend910B1 and torch_npu of release 6.0.rc2
    or later (26.0.0 or later on the 950). Then diffusers' stock SDPA is already fused on this machine."""
    soc = npu_soc_version()
    if soc is None or soc < SOC_910B1:
        return False
    version = torch_npu_version()
    if soc >= SOC_950:
        return _torch_npu_has(_RELEASE_26_0_0, version)
    return _torch_npu_has(_RELEASE_6_0_RC2, version)


def npu_sdpa_masks_precise() -> bool:
    """Whether torch_npu's SDPA passes ``inner_precise=2`` with a mask (release 26.1.0 on; before it passed 0,
    which loses precision on fully masked rows)."""
    return _torch_npu_has(_RELEASE_26_1_0, torch_npu_version())


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
def _npu_sharded_scaler_class():
    """torch_npu's FSDP loss scaler. No torch_npu release has a public ``ShardedGradScaler``: there is the
    private ``torch_npu.npu.amp.sharded_grad_scaler._ShardedGradScaler`` (6.0.0 to 26.x), which torch_npu's
    distributed patch installs as ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler``
    (torch_npu/_init/patches/distributed_patches.py ``_apply_sharded_grad_scaler_patch``). The patched name
    is preferred (the public route); the private class where the patch is not applied."""
    import importlib

    try:
        cls = importlib.import_module("torch.distributed.fsdp.sharded_grad_scaler").ShardedGradScaler
        if str(getattr(cls, "__module__", "")).startswith("torch_npu"):
            return cls
    except (ImportError, AttributeError):
        pass
    try:
        return importlib.import_module("torch_npu.npu.amp.sharded_grad_scaler")._ShardedGradScaler
    except (ImportError, AttributeError):
        return None


def make_grad_scaler(device: DeviceLike, enabled: bool = True, sharded: bool = False, **kwargs):
    """The fp16 loss scaler for ``device`` (``kwargs``: init_scale, growth_interval, ...).

    * NPU: torch_npu's own ``torch.npu.amp.GradScaler`` (sharded: torch_npu's ``_ShardedGradScaler``, see
      :func:`_npu_sharded_scaler_class`). Unlike ``torch.amp.GradScaler("npu")`` it clears the float-status
      overflow flag on SoCs without inf/nan support (910A saturation mode), all-reduces the overflow decision
      across ranks, and unscales NpuFusedAdamW's combined gradient buffer in one call
      (torch_npu/npu/amp/grad_scaler.py). It reads the overflow flag on the host every step (``.item()``):
      the NPU fp16 step synchronises. For optimizers that set ``_step_supports_amp_scaling`` it calls
      ``optimizer.step(grad_scaler=self)`` instead, which torch's own optimizers do not accept, so
      :func:`diffusers_npu.optim.build_optimizer` never hands such an optimizer to it.
    * CUDA / CPU: ``torch.amp.GradScaler(device_type)``; sharded (FSDP): torch's ``ShardedGradScaler``.

    Needs torch >= 2.3 for CPU (the first release with a CPU GradScaler); CUDA and NPU work from 2.1.
    """
    import inspect

    kind = device_type(device)
    if kind == "npu":
        npu = _require_npu_namespace("make_grad_scaler")
        cls = _npu_sharded_scaler_class() if sharded else getattr(getattr(npu, "amp", None), "GradScaler", None)
        if cls is None:
            raise RuntimeError(f"this torch_npu has no {'sharded ' if sharded else ''}loss scaler "
                               f"({'torch_npu.npu.amp.sharded_grad_scaler._ShardedGradScaler' if sharded else 'torch.npu.amp.GradScaler'})")
        if sharded and "device" in inspect.signature(cls.__init__).parameters:
            kwargs["device"] = "npu"
        return cls(enabled=enabled, **kwargs)  # the non-sharded one takes no device argument: it is NPU-only
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"Unknown device {device!r}; expected one of {VALID_DEVICES}.")
    if sharded:
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


# The keys torch's GradScaler.state_dict() writes; torch_npu's adds "dynamic" and its load_state_dict reads it
# unconditionally (torch_npu/npu/amp/grad_scaler.py), so a CUDA/CPU checkpoint fails there with KeyError.
_TORCH_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def translate_scaler_state(state: dict, scaler) -> dict:
    """A loss-scaler state saved on one device, in the form ``scaler`` (built for this device) loads.

    torch's state -> torch_npu's scaler: ``dynamic`` = True is added (torch's scaler is always dynamic).
    torch_npu's state -> torch's scaler: ``dynamic`` is dropped when True; a static (``dynamic=False``) scale
    has no equivalent in torch's scaler and is refused, as is an empty state (saved by a disabled scaler).
    Raises ValueError with the reason.
    """
    if not state:
        raise ValueError("the checkpoint's loss-scaler state is empty (it was saved by a disabled scaler)")
    missing = [k for k in ("scale", "growth_factor", "backoff_factor", "growth_interval") if k not in state]
    if missing:
        raise ValueError(f"the checkpoint's loss-scaler state lacks {', '.join(missing)}")
    state = dict(state)
    if hasattr(scaler, "_dynamic"):  # torch_npu's scalers (the sharded one inherits it)
        state.setdefault("dynamic", True)
    elif "dynamic" in state:
        if not state.pop("dynamic"):
            raise ValueError("the checkpoint was saved with a static loss scale (torch_npu GradScaler "
                             "dynamic=False), which torch's GradScaler cannot continue")
    state.setdefault("_growth_tracker", 0)
    return state


# CPU threads live in cputhreads.py (not device-specific); re-exported here, where callers have found them.
from .cputhreads import available_cpu_cores, configure_cpu_threads  # noqa: E402,F401


def _require_npu_namespace(what: str):
    npu = _torch_npu_namespace()
    if npu is None:
        raise RuntimeError(f"{what}('npu') needs torch_npu, which cannot be imported.")
    return npu


__all__ = [
    "ENV_VAR", "FUSION_ATTENTION_ENV", "VALID_DEVICES", "amp_device_type", "apply_device_settings",
    "DEVICE_MEMORY_ENV", "DIT_ATTENTION_ENV", "dit_attention_backend", "device_memory_bytes",
    "available_cpu_cores", "configure_cpu_threads", "detect_device", "device_name", "device_type",
    "empty_cache", "get_torch_npu", "is_npu_available", "make_grad_scaler", "npu_sdpa_is_fused",
    "npu_sdpa_masks_precise", "npu_soc_name", "npu_soc_version", "npu_status", "npu_supports_fusion_attention",
    "peak_memory_bytes", "reset_peak_memory", "seed_everything", "supports_bf16", "synchronize",
    "tensor_device_type", "torch_npu_version", "translate_scaler_state"
]
