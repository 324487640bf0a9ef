"""Attention processors for diffusers ``Attention`` modules on Ascend NPU, CUDA and CPU.

``set_attention(model, mode)`` installs one of our processors on every plain diffusers ``Attention``
module inside ``model`` (a UNet, a ControlNet, a VAE, or a single ``Attention``):

* ``"flash"``  -- the fused kernel of the device: the explicit ``torch_npu.npu_fusion_attention`` on NPU
  SoCs that have it (fp16/bf16; fp32 goes to torch_npu's SDPA, fused on SoC >= 910B1; SoCs without the
  kernel -- e.g. the first-generation 910A -- use ``upcast``, see
  :func:`diffusers_npu.device.npu_supports_fusion_attention`), SDPA restricted to the
  flash / memory-efficient / cuDNN backends on CUDA, plain SDPA on CPU.
* ``"upcast"`` -- scores, mask and softmax computed in fp32 with autocast disabled, output cast back to
  the input dtype. This is the fix for fp16 overflow (``|q.k| * scale > 65504`` becomes ``inf`` in the
  classic ``baddbmm`` path, and the softmax turns it into NaN).
* ``"auto"``   -- decided per call from the query's device and dtype (so moving or casting the model
  after ``set_attention`` is fine): on NPU :func:`npu_auto_path` -- torch_npu's own SDPA wherever it runs
  the fusion kernel (SoC >= Ascend910B1 with torch_npu 6.0.rc2 or later; the 950 from 26.0.0), the explicit
  kernel only where SDPA does not fuse or still masks with ``inner_precise=0``, fp32 scores only where fp16
  attention has no fused kernel (910A); fused SDPA on CUDA; upcast for fp16/bf16 on the CPU; otherwise the
  same computation as diffusers' stock processor.
* ``"default"`` -- diffusers' stock processor, chosen the way ``Attention.__init__`` chooses it
  (``AttnProcessor2_0``, or the classic ``AttnProcessor`` when ``scale_qk=False``).

Device decisions go through :func:`diffusers_npu.device.tensor_device_type` (the test seam) and the NPU
kernel is reached only through :func:`diffusers_npu.device.get_torch_npu` -- this module never imports
torch_npu itself.

Masks: diffusers hands processors either an *additive* float mask (0 = keep, a large negative value such
as -10000, ``finfo.min`` or ``-inf`` = drop) or a boolean *keep* mask (True = attend, SDPA's convention).
``npu_fusion_attention`` wants the opposite polarity: a bool mask where True = masked OUT. An additive
mask holding other values (a soft bias) cannot be expressed as a bool mask, so such calls use the fp32
path instead of the kernel rather than silently dropping the bias. A mask that is the same for every head
(all diffusers masks given per sample) is kept with a head dimension of 1 and reaches the kernel as B1SS
(11SS for batch 1): the shapes its API page lists are BNSS, B1SS, 11SS and SS, and [B,1,1,S] is refused
(torch_npu-npu_fusion_attention.md in Ascend/op-plugin; the refusal is quoted in huggingface/diffusers#13490),
so the query axis is expanded, but never the head axis.
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from . import device as _device

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("auto", "flash", "upcast", "default")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Additive-mask entries at or below this are "masked out" when translating to the NPU kernel's bool mask.
# exp(-1000) underflows to 0 in every float format, so dropping those keys is exact for any realistic
# score range; diffusers itself uses -10000.
_MASKED_THRESHOLD = -1000.0
# npu_fusion_attention supports head dims up to this (see npu-notes.md); larger ones use the fp32 path.
_NPU_FA_MAX_HEAD_DIM = 768
_INT32_MAX = 2147483647
# Upper bound for one fp32 score block in the upcast path (queries are processed in chunks).
_UPCAST_MAX_SCORE_BYTES = 256 * 1024 * 1024

_warned: set = set()
# model -> the set_attention messages already logged for it, so each model's path is logged once.
_logged: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _is_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:  # torch < 2.3
        check = getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)
    return bool(check())


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# --------------------------------------------------------------------------------------------- masks
def _prepare_mask(attn: Attention, attention_mask, key_len: int, batch_size: int):
    """diffusers mask -> (B, 1 or heads, Q or 1, K); float (additive) or bool (True = keep).

    A per-sample mask ((B, K) or (B, Q|1, K)) gets a head dimension of 1 (broadcast by every kernel)
    instead of diffusers' copy per head; per-head masks ((B*heads, Q|1, K)) go through diffusers' own
    preparation.
    """
    if attention_mask is None:
        return None
    if not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
        # Integer masks follow the tokenizer convention (1 = keep); make that explicit as a bool keep-mask.
        attention_mask = attention_mask != 0
    mask = attention_mask.unsqueeze(1) if attention_mask.dim() == 2 else attention_mask
    if mask.dim() == 3 and mask.shape[0] == batch_size and mask.shape[-1] == key_len:
        return mask.unsqueeze(1)
    mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def _mask_for_sdpa(mask, dtype: torch.dtype):
    """SDPA takes bool masks as keep-masks (as diffusers does) and float masks in the query dtype."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask.to(dtype)


def npu_bool_mask(mask: Optional[torch.Tensor], query_len: int) -> Optional[torch.Tensor]:
    """Translate a prepared diffusers mask (B, H, Q|1, K) into npu_fusion_attention's mask.

    Returns a contiguous bool tensor where True = masked OUT, of shape (B, 1, Q, K) (B1SS; 11SS for
    B = 1) when the mask is the same for every head, else (B, H, Q, K) (BNSS); or raises ``ValueError`` if
    the mask is a soft additive bias (values other than 0 and <= -1000) that a bool mask cannot represent.
    ``None`` stays ``None``. Checking for a soft bias reads one bool on the host (float masks only).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        masked_out = ~mask  # SDPA / diffusers keep-mask -> kernel drop-mask
    else:
        masked_out = mask <= _MASKED_THRESHOLD  # also true for -inf
        kept = mask == 0
        if not bool((masked_out | kept).all()):
            raise ValueError("additive attention mask holds soft bias values; a bool mask cannot express them")
    b, h, _, k = masked_out.shape
    # Q is expanded because the kernel takes no [B,1,1,S]; materialised because a stride-0 view's layout
    # is not documented as accepted.
    return masked_out.expand(b, h, query_len, k).contiguous()


# ----------------------------------------------------------------------------------------- kernels
def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask_for_sdpa(mask, q.dtype), dropout_p=0.0, scale=scale)


def _upcast_attention(q, k, v, mask, scale):
    """fp32 scores/mask/softmax with autocast off; result in the input dtype.

    Written as explicit matmuls (not SDPA) so that the numerics are exactly "fp32 q@k^T*scale + mask,
    fp32 softmax, fp32 @ v" on every backend. The fp32 score matrix is built for chunks of queries so
    that one chunk stays under ``_UPCAST_MAX_SCORE_BYTES`` (768 px SD would otherwise need tens of GiB).
    """
    dtype = q.dtype
    b, h, q_len, _ = q.shape
    k_len = k.shape[2]
    chunk = max(1, min(q_len, _UPCAST_MAX_SCORE_BYTES // max(1, b * h * k_len * 4)))
    with torch.autocast(device_type=q.device.type, enabled=False):
        k32 = k.float().transpose(-1, -2)
        v32 = v.float()
        outs = []
        for start in range(0, q_len, chunk):
            stop = min(q_len, start + chunk)
            scores = torch.matmul(q[:, :, start:stop].float(), k32) * scale
            if mask is not None:
                m = mask if mask.shape[2] == 1 else mask[:, :, start:stop]
                if m.dtype == torch.bool:
                    scores = scores.masked_fill(~m, float("-inf"))
                else:
                    scores = scores + m.float()
            outs.append(torch.matmul(scores.softmax(dim=-1), v32))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.to(dtype)


def _cuda_fused_sdpa(q, k, v, mask, scale):
    """SDPA restricted to fused backends. Raises RuntimeError if none of them accepts the inputs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no per-call backend selection, let SDPA choose
        return _sdpa(q, k, v, mask, scale)
    # Flash cannot take an arbitrary mask; listing the memory-efficient and cuDNN kernels too lets
    # torch pick the first fused kernel that can, and never the O(S^2)-memory math kernel.
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(backends):
        return _sdpa(q, k, v, mask, scale)


def _inner_precise(npu_mask, query_len: int) -> int:
    """2 with a mask on more than one query, else 0: torch_npu's own SDPA rule (op-plugin
    ScaledDotProductAttentionKernelNpuOpApi.cpp ``calculate_inner_precise_for_fa``, release 26.1.0), which
    keeps fully masked rows from losing precision; 0 is the kernel's default."""
    return 2 if npu_mask is not None and query_len > 1 else 0


def _npu_fusion_attention(attn: Attention, q, k, v, npu_mask):
    torch_npu = _device.get_torch_npu()
    return torch_npu.npu_fusion_attention(
        q,
        k,
        v,
        attn.heads,
        input_layout="BNSD",
        pse=None,
        atten_mask=npu_mask,
        scale=attn.scale,
        keep_prob=1.0,
        pre_tockens=_INT32_MAX,
        next_tockens=_INT32_MAX,
        inner_precise=_inner_precise(npu_mask, q.shape[2]),
        sparse_mode=0,
    )[0]


def _npu_sdpa(q, k, v, mask, scale):
    """SDPA on NPU tensors in the form torch_npu fuses: torch_npu's SDPA runs npu_fusion_attention only for a
    bool mask or none (a float mask takes its unfused math path), and before release 26.1.0 it passed the
    mask to the kernel as given, which refuses ``[B,1,1,S]`` -- so the mask goes in as B1SS/BNSS bool
    (True = attend). Raises ValueError for a soft additive bias (see :func:`npu_bool_mask`)."""
    keep = None if mask is None else ~npu_bool_mask(mask, q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.0, scale=scale)


# -------------------------------------------------------------------------------------- processors
class _DiffusersNpuAttnProcessor:
    """Shared pre/post-processing, mirroring diffusers' ``AttnProcessor2_0``; subclasses pick the kernel.

    Processors are stateless apart from ``path_counts`` (which kernel path ran how often; for logging and
    tests), so one instance is shared by all modules.
    """

    mode = "?"

    def __init__(self):
        self.path_counts: Counter = Counter()

    def __repr__(self):
        return f"{type(self).__name__}()"

    def _count(self, path: str) -> None:
        # Not while torch.compile traces: a Python counter mutated inside the graph fails dynamo's guards on
        # every call, so a compiled UNet would recompile at each step (then fall back to eager).
        if not _is_compiling():
            self.path_counts[path] += 1

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Extra args (e.g. the deprecated LoRA `scale`) are ignored, like diffusers' own processors do.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, key_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        mask = _prepare_mask(attn, attention_mask, key_len, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (B, S, H*D) -> (B, H, S, D): the "BNSD" layout both SDPA and npu_fusion_attention take.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self._attend(attn, query, key, value, mask)

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)  # linear projection
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # -- kernels; each records which path it took --------------------------------------------------
    def _attend(self, attn, q, k, v, mask):  # pragma: no cover - abstract
        raise NotImplementedError

    def _run_sdpa(self, attn, q, k, v, mask):
        self._count("sdpa")
        return _sdpa(q, k, v, mask, attn.scale)

    def _run_upcast(self, attn, q, k, v, mask):
        self._count("upcast_fp32")
        return _upcast_attention(q, k, v, mask, attn.scale)

    def _run_npu_sdpa(self, attn, q, k, v, mask):
        """torch_npu's SDPA (fused on this machine, see device.npu_sdpa_is_fused); a soft additive mask, which
        it would run unfused, takes the fp32-safe path instead."""
        try:
            out = _npu_sdpa(q, k, v, mask, attn.scale)
        except ValueError as exc:
            _warn_once("npu_sdpa_softmask", f"{exc}; using the fp32 attention path for such calls.")
            return self._run_upcast(attn, q, k, v, mask) if q.dtype in _HALF_DTYPES else \
                self._run_sdpa(attn, q, k, v, mask)
        self._count("sdpa_npu_fused")
        return out

    def _run_flash(self, attn, q, k, v, mask):
        """Device's fused kernel; falls back (fp32-safe) when the kernel cannot take the inputs."""
        kind = _device.tensor_device_type(q)
        if kind == "npu":
            if q.dtype not in _HALF_DTYPES and _device.npu_sdpa_is_fused():
                return self._run_npu_sdpa(attn, q, k, v, mask)  # fp32: torch_npu's SDPA fuses it
            if not _device.npu_supports_fusion_attention():
                # No fusion kernel on this SoC (e.g. 910A): the fp32-safe path for half, plain SDPA for fp32.
                return self._run_upcast(attn, q, k, v, mask) if q.dtype in _HALF_DTYPES else \
                    self._run_sdpa(attn, q, k, v, mask)
            if q.dtype not in _HALF_DTYPES:
                # The kernel only takes fp16/bf16; fp32 must never reach it.
                _warn_once("npu_fp32", "npu_fusion_attention needs fp16/bf16 inputs; using fp32 SDPA instead.")
                return self._run_sdpa(attn, q, k, v, mask)
            if q.shape[-1] > _NPU_FA_MAX_HEAD_DIM:
                _warn_once("npu_hdim", f"head dim {q.shape[-1]} > {_NPU_FA_MAX_HEAD_DIM}: not using npu_fusion_attention.")
                return self._run_upcast(attn, q, k, v, mask)
            try:
                npu_mask = npu_bool_mask(mask, q.shape[2])
            except ValueError as exc:
                _warn_once("npu_softmask", f"{exc}; using the fp32 attention path for such calls.")
                return self._run_upcast(attn, q, k, v, mask)
            self._count("npu_fusion_attention")
            return _npu_fusion_attention(attn, q, k, v, npu_mask)
        if kind == "cuda":
            try:
                out = _cuda_fused_sdpa(q, k, v, mask, attn.scale)
            except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but not one to paper over
                raise
            except RuntimeError as exc:  # "No available kernel": no fused backend takes these inputs
                _warn_once("cuda_nokernel", f"No fused SDPA kernel for these inputs ({exc}); falling back.")
                if q.dtype in _HALF_DTYPES:
                    return self._run_upcast(attn, q, k, v, mask)
                return self._run_sdpa(attn, q, k, v, mask)
            self._count("sdpa_fused_cuda")
            return out
        return self._run_sdpa(attn, q, k, v, mask)


class FlashAttnProcessor(_DiffusersNpuAttnProcessor):
    """Fused attention kernel of the device (see module docstring)."""

    mode = "flash"

    def _attend(self, attn, q, k, v, mask):
        return self._run_flash(attn, q, k, v, mask)


class UpcastAttnProcessor(_DiffusersNpuAttnProcessor):
    """Scores and softmax in fp32 (autocast off), output in the input dtype."""

    mode = "upcast"

    def _attend(self, attn, q, k, v, mask):
        return self._run_upcast(attn, q, k, v, mask)


def npu_auto_path(dtype: torch.dtype, masked: bool) -> str:
    """What ``auto`` runs on this NPU for ``dtype`` (and a mask or not): one of ``"sdpa_npu_fused"``,
    ``"npu_fusion_attention"``, ``"upcast_fp32"``, ``"sdpa"``.

    * torch_npu's SDPA fuses here (SoC >= Ascend910B1 with a recent enough torch_npu): SDPA, as diffusers'
      stock processor would -- except with a mask on a torch_npu older than 26.1.0, whose SDPA passes
      ``inner_precise=0``: there the explicit kernel with ``inner_precise=2`` (the newer SDPA's own setting).
    * the explicit kernel exists but SDPA does not fuse (older torch_npu): the explicit kernel for fp16/bf16.
    * no fused fp16/bf16 attention at all (the first-generation 910): fp32 scores ("upcast").
    * fp32 elsewhere: SDPA.
    """
    half = dtype in _HALF_DTYPES
    kernel = half and _device.npu_supports_fusion_attention()
    if _device.npu_sdpa_is_fused():
        if masked and kernel and not _device.npu_sdpa_masks_precise():
            return "npu_fusion_attention"
        return "sdpa_npu_fused"
    if kernel:
        return "npu_fusion_attention"
    return "upcast_fp32" if half else "sdpa"


class AutoAttnProcessor(_DiffusersNpuAttnProcessor):
    """Decides per call: on NPU :func:`npu_auto_path`; fused SDPA on CUDA; upcast for other fp16/bf16; else
    stock SDPA."""

    mode = "auto"

    def _attend(self, attn, q, k, v, mask):
        kind = _device.tensor_device_type(q)
        half = q.dtype in _HALF_DTYPES
        if kind == "npu":
            path = npu_auto_path(q.dtype, mask is not None)
            if path == "sdpa_npu_fused":
                return self._run_npu_sdpa(attn, q, k, v, mask)
            if path == "npu_fusion_attention":
                return self._run_flash(attn, q, k, v, mask)
            return self._run_upcast(attn, q, k, v, mask) if path == "upcast_fp32" else \
                self._run_sdpa(attn, q, k, v, mask)
        if kind == "cuda":
            return self._run_flash(attn, q, k, v, mask)
        if half:
            return self._run_upcast(attn, q, k, v, mask)
        return self._run_sdpa(attn, q, k, v, mask)


_PROCESSOR_CLASSES = {"flash": FlashAttnProcessor, "upcast": UpcastAttnProcessor, "auto": AutoAttnProcessor}


def stock_processor(attn: Attention):
    """The processor diffusers' ``Attention.__init__`` would pick for this module."""
    # AttnProcessor2_0 uses SDPA's default scale 1/sqrt(head_dim), so diffusers only uses it when
    # scale_qk is on; the classic processor honours attn.scale.
    return AttnProcessor2_0() if attn.scale_qk else AttnProcessor()


def _skip_reason(attn: Attention) -> Optional[str]:
    """Why our processors cannot serve this module (None = they can)."""
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "added KV projections (AddedKV / joint attention)"
    if attn.to_k is None or attn.to_v is None or attn.to_out is None:
        return "no to_k/to_v/to_out projections"
    if getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim:
        return "grouped-query attention (kv_heads != heads)"
    if getattr(attn, "is_causal", False):
        return "causal attention"
    if isinstance(attn.processor, nn.Module):
        # IP-Adapter / custom-diffusion processors carry trained weights; replacing them would drop those.
        return f"processor {type(attn.processor).__name__} holds weights"
    return None


def count_attention_modules(model: nn.Module) -> int:
    """Number of diffusers ``Attention`` modules in ``model`` (0 for e.g. a text encoder's ``Embedding``).

    Callers that train modules which may hold no attention (textual inversion's embedding) check this
    before :func:`set_attention` instead of relying on its message.
    """
    return sum(isinstance(m, Attention) for m in model.modules())


def describe_attention_path(mode: str, model: nn.Module) -> str:
    """Which kernel ``mode`` gives ``model``'s attention on the device its parameters are on (for the log)."""
    key = str(mode).strip().lower()
    if key == "default":
        return "diffusers' stock processor"
    if key == "upcast":
        return "upcast (fp32 scores)"
    param = next(model.parameters(), None)
    kind = _device.tensor_device_type(param) if param is not None else "cpu"
    if kind == "npu":
        soc = _device.npu_soc_name() or "unknown SoC"
        where = f"{soc}, torch_npu {_device.torch_npu_version() or '?'}"
        if key == "auto":
            half, fp32 = npu_auto_path(torch.float16, False), npu_auto_path(torch.float32, False)
            masked = npu_auto_path(torch.float16, True)
            extra = f"; with a mask {masked}" if masked != half else ""
            return f"{half} for fp16/bf16{extra}, {fp32} for fp32 ({where})"
        if not _device.npu_supports_fusion_attention():
            return f"upcast ({where}: no fusion attention kernel)"
        fp32 = "torch_npu's fused SDPA" if _device.npu_sdpa_is_fused() else "SDPA"
        return f"npu_fusion_attention ({where}) for fp16/bf16, {fp32} for fp32"
    if kind == "cuda":
        return "fused SDPA (flash / memory-efficient / cuDNN)"
    return f"SDPA ({kind})" if key == "flash" else f"SDPA for fp32, upcast for fp16/bf16 ({kind})"


def _set_dispatch_backend(model: nn.Module, key: str):
    """Transformer attention that goes through diffusers' attention dispatcher (FLUX's ``FluxAttention``; not a
    diffusers ``Attention``, so our processors do not apply): every mode but ``default`` pins its backend to
    :func:`diffusers_npu.device.dit_attention_backend` (SDPA unless asked otherwise), so an environment-wide
    diffusers setting cannot switch it. Returns (backend, count), or None when there are none."""
    from diffusers.models.attention import AttentionModuleMixin

    modules = [m for m in model.modules() if isinstance(m, AttentionModuleMixin) and not isinstance(m, Attention)
               and hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not modules or key == "default":
        return None
    parallel = any(getattr(m.processor, "_parallel_config", None) is not None for m in modules)
    backend = _device.dit_attention_backend(context_parallel=parallel)
    for m in modules:
        m.processor._attention_backend = backend
    return backend, len(modules)


def set_attention(model: nn.Module, mode: str = "auto") -> nn.Module:
    """Install the attention implementation ``mode`` on every diffusers ``Attention`` in ``model``.

    Args:
        model: any ``nn.Module`` (UNet2DConditionModel, ControlNetModel, AutoencoderKL, a single
            ``Attention``...). Modules our processors cannot serve (added-KV / joint attention, GQA,
            causal, processors holding weights) keep their processor; this is logged.
        mode: one of ``"auto"``, ``"flash"``, ``"upcast"``, ``"default"`` (case-insensitive).

    Logs once per model (INFO) which path it got, e.g. ``set_attention(auto) on UNet2DConditionModel:
    npu_fusion_attention (Ascend910B2) ...`` or ``...: upcast (Ascend910A: no fusion attention)``. A model
    without attention modules is left alone with a DEBUG line (see :func:`count_attention_modules`).

    Returns:
        ``model`` itself, for chaining.
    """
    key = str(mode).strip().lower() if mode is not None else "auto"
    if key not in ATTENTION_MODES:
        raise ValueError(f"Unknown attention mode {mode!r}; expected one of {', '.join(ATTENTION_MODES)}.")
    shared = _PROCESSOR_CLASSES[key]() if key != "default" else None
    changed, skipped = 0, Counter()
    dispatching = _set_dispatch_backend(model, key)
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        reason = _skip_reason(module)
        if reason is not None:
            skipped[reason] += 1
            continue
        module.set_processor(shared if shared is not None else stock_processor(module))
        changed += 1
    name = type(model).__name__
    if dispatching:
        logger.info("set_attention(%s): %d dispatching attention module(s) of %s use diffusers' %s backend", key,
                    dispatching[1], name, dispatching[0])
    if changed == 0 and not skipped:
        logger.debug("set_attention(%s): %s has no diffusers Attention modules; nothing to do", key, name)
        return model
    for reason, count in skipped.items():
        logger.info("set_attention(%s): kept the processor of %d module(s) of %s: %s", key, count, name, reason)
    if changed:
        message = f"set_attention({key}) on {name}: {describe_attention_path(key, model)}"
        seen = _logged.setdefault(model, set())
        if message not in seen:
            seen.add(message)
            logger.info("%s [%d attention module(s)]", message, changed)
    return model


def attention_mode_summary(model: nn.Module) -> Dict[str, int]:
    """Processor class name -> number of diffusers ``Attention`` modules using it."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, Attention):
            counts[type(module.processor).__name__] += 1
    return dict(counts)


__all__ = [
    "ATTENTION_MODES",
    "AutoAttnProcessor",
    "FlashAttnProcessor",
    "UpcastAttnProcessor",
    "attention_mode_summary",
    "count_attention_modules",
    "npu_auto_path",
    "describe_attention_path",
    "npu_bool_mask",
    "set_attention",
    "stock_processor",
]
