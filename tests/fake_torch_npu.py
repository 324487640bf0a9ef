"""A strict RECORDING stand-in for ``torch_npu``, for contract tests on machines without an Ascend NPU.

It is not a simulator: it records how the project calls torch_npu, computes true results with reference
maths (so outputs can be checked against float64 references), and REFUSES every call the real API refuses
that the project could plausibly make. Each rule below names its source; tests/test_device.py,
test_attention.py and test_optim.py hold one rejecting test per rule (``test_stand_in_rejects_*``).

Rules (sources: Ascend/pytorch = torch_npu, Ascend/op-plugin = its operators and API pages; the tables below
are this file's own, copied from those documents -- never imported from ``src/``, so a wrong table in the
project is caught rather than mirrored):

1. ``npu_fusion_attention``: q/k/v fp16 or bf16 of one dtype (older API pages; fp32 was added later, so
   refusing it is the strict side); layout BNSD is the only one modelled; ``head_num`` = N of q and k;
   k and v the same shape; head dim <= 768; ``atten_mask`` bool/uint8 (True = masked OUT) of shape BNSS,
   B1SS, 11SS or SS exactly -- ``[B,1,1,S]`` is refused ("get unsupported atten_mask shape", quoted in
   huggingface/diffusers#13490); only on the SoCs of ``FUSION_KERNEL_SOCS`` (below). ``inner_precise``:
   "0、1为保留配置值，2为开启无效行计算 ... 避免在计算过程中存在整行mask进而导致精度有损失" (API page): a fully
   masked row comes out NaN here unless ``inner_precise=2`` (then 0).
2. ``npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
   max_grad_norm=None, amsgrad=None, maximize=None, *, out)``: the 7th argument is ``epsilon`` and ``out``
   is keyword-only (op-plugin schema ``npu_apply_adam_w.out(..., Scalar epsilon, ..., *, Tensor(a!) var,
   ...)``); var/m/v/grad of one shape AND one dtype (op-plugin ApplyAdamWKernelNpu.cpp casts every scalar to
   var's dtype but passes grad as it is; aclnnApplyAdamW.md, cann/ops-nn: m/v "shape、dtype要求与varRef一致");
   amsgrad=True needs max_grad_norm and is unsupported. The kernel bias-corrects with ``beta_power * beta``.
3. ``optim.NpuFusedAdamW`` (torch_npu/optim/npu_fused_adamw.py, npu_fused_optim_base.py): default
   ``weight_decay=1e-2``; at the first step / zero_grad / clip it combines the parameters that HAVE a
   gradient at that moment into one flat buffer per dtype -- fp32/fp16 only (TypeError), contiguous NPU
   tensors, no DTensors (npu_combine_tensors: "须全部为内存连续的、dtype相同的NPU Tensor"; torch_npu registers no
   DTensor strategy for it) -- and from then on steps those parameters only, from that buffer: a parameter
   whose grad was None then is never updated; a ``p.grad`` REPLACED later (as DeepSpeed ZeRO does) would be
   ignored by the real class, so the stand-in raises; ``zero_grad(set_to_none=True)`` raises ValueError.
4. ``torch.npu.config.allow_internal_format`` is write-only: torch_npu's ``npuConfig`` defines only
   ``__setattr__`` (torch_npu/npu/npu_config.py), so reading it raises AttributeError. Writes are recorded.
5. ``set_compile_mode(jit_compile=False)``: the default is False (npu_config.py). ``set_option(dict)``:
   ``ACL_PRECISION_MODE`` in {allow_fp32_to_fp16, must_keep_origin_dtype} (npu_config.py ``_option_map``).
6. channels_last on an NPU tensor is refused: ``Tensor.to(memory_format=channels_last)`` -> "Only
   contiguous_format or preserve_format is supported." (torch_npu's _to_copy TORCH_CHECK, which
   ``Module.to(memory_format=...)`` reaches), ``.contiguous(memory_format=channels_last)`` -> "NPU contiguous
   operator only supported contiguous memory format."
7. ``torch.npu.amp.GradScaler(init_scale, growth_factor, backoff_factor, growth_interval, dynamic,
   enabled)`` takes no device argument and scales NPU tensors only (torch_npu/npu/amp/grad_scaler.py). Its
   ``step`` calls ``optimizer.step(*args, grad_scaler=self)`` for optimizers with
   ``_step_supports_amp_scaling`` (torch's fused AdamW does not take that keyword), else unscales, reads
   found_inf on the host and skips or steps. ``state_dict`` adds ``dynamic``; ``load_state_dict`` reads it
   (KeyError without). The sharded one exists only as the private
   ``torch_npu.npu.amp.sharded_grad_scaler._ShardedGradScaler(device="npu", ...)``, which torch_npu installs as
   ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` (_init/patches/distributed_patches.py).
8. fp32 precision (torch_npu LazyInitAclops.cpp SetPrecisionMode, EnvVariables.cpp IsAllowFP32ToFP16): below
   Ascend910B1 the default ``ACL_PRECISION_MODE`` is ``allow_fp32_to_fp16``, so fp32 matmul / linear / conv /
   bmm on NPU tensors compute with fp16-rounded inputs and output, until ``set_option`` sets
   ``must_keep_origin_dtype``. (Vector ops keep fp32: "For vector-type operators, prioritize the original
   precision", CANN precision_mode.)
9. torch_npu's ``scaled_dot_product_attention`` (op-plugin ScaledDotProductAttentionKernelNpuOpApi.cpp, by
   release): from 6.0.rc2, on SoC >= Ascend910B1 (on the 950 from 26.0.0), fp16/bf16/fp32 BNSD with a bool
   mask or none, N <= 2048, D <= 512 (fp32: D % 4 == 0), it calls ``npu_fusion_attention`` with the mask
   inverted; before 26.1.0 with ``inner_precise=0`` and the mask as given (so ``[B,1,1,S]`` is refused),
   from 26.1.0 with ``inner_precise=2`` when masked and masks broadcast to BNSS. Anything else runs the
   unfused math path (recorded as ``sdpa_math``).

``install(monkeypatch, ...)`` (undone at teardown): ``sys.modules['torch_npu']`` and ``torch.npu`` become the
fake, ``diffusers_npu.device``'s caches are cleared, and with ``pretend_npu=True`` CPU tensors report device
type ``"npu"`` through ``diffusers_npu.device.tensor_device_type`` (the one seam processors and optimizers use).
"""
from __future__ import annotations

import sys
import types
from typing import Any, Dict, List

import pytest
import torch

_HALF = (torch.float16, torch.bfloat16)
SOC_910B2, SOC_910A, SOC_910_9391, SOC_950 = 221, 102, 250, 260

# enum c10_npu::SocVersion, torch_npu/csrc/core/npu/NpuVariables.h (Ascend/pytorch master).
SOC_NAMES = {100: "Ascend910PremiumA", 101: "Ascend910ProA", 102: "Ascend910A", 103: "Ascend910ProB",
             104: "Ascend910B", 200: "Ascend310P1", 201: "Ascend310P2", 202: "Ascend310P3", 203: "Ascend310P4",
             204: "Ascend310P5", 205: "Ascend310P7", 220: "Ascend910B1", 221: "Ascend910B2", 222: "Ascend910B2C",
             223: "Ascend910B3", 224: "Ascend910B4", 225: "Ascend910B4_1", 240: "Ascend310B1", 241: "Ascend310B2",
             242: "Ascend310B3", 243: "Ascend310B4", 250: "Ascend910_9391", 251: "Ascend910_9392",
             252: "Ascend910_9381", 253: "Ascend910_9382", 254: "Ascend910_9372", 255: "Ascend910_9362",
             256: "Ascend910_9363", 260: "Ascend950"}
ASCEND910B1 = 220
# Where npu_fusion_attention runs: "Atlas A2 训练系列产品" and "Ascend 950DT" (torch_npu-npu_fusion_attention.md,
# Ascend/op-plugin master); Atlas A3 (CANN aclnnFlashAttentionScore.md); the 950 branch calling
# aclnnFlashAttentionScoreV4 appears in op-plugin 26.0.0 (FlashAttentionKernelNpuOpApi.cpp).
FUSION_KERNEL_SOCS = {220, 221, 222, 223, 224, 225, 250, 251, 252, 253, 254, 255, 256}
FUSION_KERNEL_950_FROM = "26.0.0"
# torch_npu package version -> Ascend Extension release (Ascend/pytorch COMPATIBILITY.md, rows used here).
RELEASE_OF = {"2.1.0.post4": "6.0.rc1", "2.2.0": "6.0.rc1", "2.1.0.post6": "6.0.rc2", "2.2.0.post2": "6.0.rc2",
              "2.3.1": "6.0.rc2", "2.1.0.post8": "6.0.rc3", "2.4.0": "6.0.rc3", "2.1.0.post10": "6.0.0",
              "2.4.0.post2": "6.0.0", "2.5.1": "7.0.0", "2.6.0": "7.1.0", "2.7.1": "7.2.0", "2.6.0.post5": "7.3.0",
              "2.8.0.post2": "7.3.0", "2.7.1.post4": "26.0.0", "2.9.0.post2": "26.0.0", "2.7.1.post8": "26.1.0",
              "2.10.0.post4": "26.1.0", "2.12.0": "26.1.0"}
_RELEASE_ORDER = ["6.0.rc1", "6.0.rc2", "6.0.rc3", "6.0.0", "7.0.0", "7.1.0", "7.2.0", "7.3.0", "26.0.0", "26.1.0"]


def release_at_least(version: str, release: str) -> bool:
    if version not in RELEASE_OF:
        raise KeyError(f"the stand-in's release table has no torch_npu {version!r}; add its COMPATIBILITY.md row")
    return _RELEASE_ORDER.index(RELEASE_OF[version]) >= _RELEASE_ORDER.index(release)


# The real functions, captured before install() wraps them (the fake's own maths must not be rewrapped).
_real = {"matmul": torch.matmul, "bmm": torch.bmm, "baddbmm": torch.baddbmm,
         "linear": torch.nn.functional.linear, "conv2d": torch.nn.functional.conv2d,
         "sdpa": torch.nn.functional.scaled_dot_product_attention}


def _npu(tensor) -> bool:
    from diffusers_npu import device as dev

    return dev.tensor_device_type(tensor) == "npu"


class FakeTorchNpu(types.ModuleType):
    """Fresh per test; ``calls`` is the ordered record of every call into the fake."""

    def __init__(self, device_count: int = 1, bf16: bool = True, soc_version: int = SOC_910B2,
                 version: str = "2.7.1.post8"):
        super().__init__("torch_npu")
        self.__file__ = __file__
        self.__version__ = version
        self.calls: List[Dict[str, Any]] = []
        self.soc_version = soc_version
        # rule 8: torch_npu's default precision mode for this SoC, until set_option changes it
        self.precision_mode = "must_keep_origin_dtype" if soc_version >= ASCEND910B1 else "allow_fp32_to_fp16"
        self.npu = _FakeNpuNamespace(self, device_count, bf16)
        self.optim = types.SimpleNamespace(NpuFusedAdamW=_make_fused_adamw(self))

    def kernel_on_this_soc(self) -> bool:
        if self.soc_version == SOC_950:
            return release_at_least(self.__version__, FUSION_KERNEL_950_FROM)
        return self.soc_version in FUSION_KERNEL_SOCS

    def record(self, name: str, **info) -> Dict[str, Any]:
        entry = {"name": name, **info}
        self.calls.append(entry)
        return entry

    def calls_named(self, name: str) -> List[Dict[str, Any]]:
        return [c for c in self.calls if c["name"] == name]

    # -- rule 1 ------------------------------------------------------------------------------------
    def npu_fusion_attention(self_, query, key, value, head_num, input_layout, pse=None, padding_mask=None,  # noqa: N805
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                             actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
        self_.record(
            "npu_fusion_attention", input_layout=input_layout, head_num=head_num, scale=scale,
            keep_prob=keep_prob, pre_tockens=pre_tockens, next_tockens=next_tockens, sparse_mode=sparse_mode,
            pse=pse, inner_precise=inner_precise, via=self_._via, q_shape=tuple(query.shape), k_shape=tuple(key.shape), v_shape=tuple(value.shape),
            dtypes=(query.dtype, key.dtype, value.dtype),
            mask_dtype=None if atten_mask is None else atten_mask.dtype,
            mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
            mask=None if atten_mask is None else atten_mask.detach().clone())
        soc = SOC_NAMES.get(self_.soc_version, str(self_.soc_version))
        if not self_.kernel_on_this_soc():
            raise RuntimeError(f"npu_fusion_attention: FlashAttentionScore is not supported on {soc} "
                               f"(torch_npu {self_.__version__})")
        # fp32 only from torch_npu's own SDPA (current API pages list float32; older ones did not)
        allowed = _HALF + ((torch.float32,) if self_._via == "sdpa" else ())
        if query.dtype not in allowed or key.dtype != query.dtype or value.dtype != query.dtype:
            raise TypeError(f"npu_fusion_attention takes float16/bfloat16 q/k/v of one dtype, got "
                            f"{query.dtype}/{key.dtype}/{value.dtype}")
        if input_layout != "BNSD":
            raise NotImplementedError(f"fake npu_fusion_attention only models BNSD, got {input_layout!r}")
        if query.dim() != 4 or key.dim() != 4 or query.shape[1] != head_num or key.shape[1] != head_num:
            raise ValueError(f"BNSD expects (B, {head_num}, S, D); got q{tuple(query.shape)} k{tuple(key.shape)}")
        if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[3] != query.shape[3]:
            raise ValueError(f"k/v must match q's B and D and each other; got q{tuple(query.shape)} "
                             f"k{tuple(key.shape)} v{tuple(value.shape)}")
        if query.shape[3] > 768:
            raise ValueError(f"npu_fusion_attention: head dim must be 1..768, got {query.shape[3]}")
        b, n, sq, _ = query.shape
        skv = key.shape[2]
        if atten_mask is not None:
            if atten_mask.dtype not in (torch.bool, torch.uint8):
                raise TypeError(f"atten_mask must be bool/uint8 (1 = masked out), got {atten_mask.dtype}")
            shape = tuple(atten_mask.shape)
            if shape not in {(b, n, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv)}:
                raise RuntimeError(f"get unsupported atten_mask shape, the shape is {list(shape)}; supported: "
                                   f"BNSS, B1SS, 11SS, SS with B={b} N={n} Sq={sq} Skv={skv}")
        if keep_prob != 1.0 or sparse_mode != 0:
            raise NotImplementedError("fake npu_fusion_attention models keep_prob=1, sparse_mode=0 only")
        scores = _real["matmul"](query.double(), key.double().transpose(-1, -2)) * float(scale)
        if atten_mask is not None:
            scores = scores.masked_fill(atten_mask.bool(), float("-inf"))
        probs = scores.softmax(-1)
        if atten_mask is not None and inner_precise == 2:  # "无效行计算": fully masked rows give 0
            probs = torch.nan_to_num(probs, nan=0.0)
        out = _real["matmul"](probs, value.double()).to(query.dtype)
        stats = torch.zeros(b, n, sq, 8)
        return out, stats, stats.clone(), torch.zeros(()), 0, 0, 0

    _via = "explicit"

    # -- rule 9 ------------------------------------------------------------------------------------
    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        """torch_npu's scaled_dot_product_attention on NPU tensors (rule 9)."""
        version = self.__version__
        fused_soc = self.soc_version >= ASCEND910B1 and (
            self.soc_version != SOC_950 or release_at_least(version, FUSION_KERNEL_950_FROM))
        q4 = query.dim() == 4 and key.dim() == 4 and value.dim() == 4
        fused = (release_at_least(version, "6.0.rc2") and fused_soc and q4
                 and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
                 and (attn_mask is None or attn_mask.dtype == torch.bool)
                 and query.shape[1] <= 2048 and query.shape[3] <= 512
                 and not (query.dtype == torch.float32 and query.shape[-1] % 4) and not is_causal)
        self.record("sdpa", fused=fused, dtype=query.dtype, mask_dtype=None if attn_mask is None else attn_mask.dtype)
        if not fused:
            return _real["sdpa"](query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, **kwargs)
        mask = None if attn_mask is None else ~attn_mask
        new = release_at_least(version, "26.1.0")
        if mask is not None and new:
            b, n, sq, skv = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
            shapes = {(sq, skv), (b, n, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv)}
            if tuple(mask.shape) not in shapes:
                mask = mask.expand(b, n, sq, skv)
        precise = 2 if (new and mask is not None and query.shape[2] > 1) else 0
        scale = 1.0 / query.shape[-1] ** 0.5 if scale is None else scale
        self._via = "sdpa"
        try:
            return self.npu_fusion_attention(query, key, value, query.shape[1], "BNSD", atten_mask=mask,
                                             scale=scale, keep_prob=1.0 - dropout_p, inner_precise=precise)[0]
        finally:
            self._via = "explicit"

    # -- rule 2 ------------------------------------------------------------------------------------
    def npu_apply_adam_w(self, beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
                         max_grad_norm=None, amsgrad=None, maximize=None, *, out):
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise TypeError("npu_apply_adam_w: out must be the tuple (var, m, v)")
        var, m, v = out
        self.record("npu_apply_adam_w", beta1_power=beta1_power, beta2_power=beta2_power, lr=lr,
                    weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=epsilon, max_grad_norm=max_grad_norm,
                    amsgrad=amsgrad, maximize=maximize, shape=tuple(var.shape))
        if not (var.shape == m.shape == v.shape == grad.shape):
            raise RuntimeError(f"npu_apply_adam_w: var/m/v/grad shapes differ: {tuple(var.shape)} {tuple(m.shape)} "
                               f"{tuple(v.shape)} {tuple(grad.shape)}")
        if not (var.dtype == m.dtype == v.dtype == grad.dtype):
            raise RuntimeError(f"npu_apply_adam_w: var/m/v/grad must have one dtype, got {var.dtype} "
                               f"{m.dtype} {v.dtype} {grad.dtype}")
        if amsgrad:
            raise RuntimeError("npu_apply_adam_w: amsgrad is only supported as False"
                               + ("" if max_grad_norm is not None else " (and needs max_grad_norm)"))
        with torch.no_grad():
            b1p, b2p = beta1_power * beta1, beta2_power * beta2  # the kernel's convention
            g = -grad if maximize else grad
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            var.mul_(1 - lr * weight_decay)
            var.addcdiv_(m, (v / (1 - b2p)).sqrt().add_(epsilon), value=-lr / (1 - b1p))
        return var, m, v


# ----------------------------------------------------------------------------------- rules 4, 5, 7
class _WriteOnlyConfig:
    """torch.npu.config: writes are recorded; reads raise like torch_npu's npuConfig (rule 4)."""

    def __init__(self, owner):
        object.__setattr__(self, "_owner", owner)

    def __setattr__(self, name, value):
        self._owner.record("torch.npu.config.set", attr=name, value=value)

    def __getattr__(self, name):
        raise AttributeError(f"'npuConfig' object has no attribute '{name}'")


def _make_grad_scalers(owner):
    class GradScaler(torch.amp.GradScaler):
        """torch_npu.npu.amp.GradScaler: NPU-only, no device argument, torch_npu's step protocol (rule 7)."""

        def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                     dynamic=True, enabled=True):
            if not isinstance(init_scale, (int, float)):
                raise TypeError(f"init_scale must be a number, got {init_scale!r} (this scaler takes no device)")
            owner.record(type(self).__name__, init_scale=init_scale, enabled=enabled, dynamic=dynamic)
            super().__init__("cpu", init_scale=init_scale, growth_factor=growth_factor,
                             backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)
            self._dynamic = dynamic

        def scale(self, outputs):
            for t in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
                if isinstance(t, torch.Tensor) and not _npu(t):
                    raise ValueError("Device type of outputs should be npu.")
            return super().scale(outputs)

        def step(self, optimizer, *args, **kwargs):
            if not self._enabled:
                return optimizer.step(*args, **kwargs)
            state = self._per_optimizer_states[id(optimizer)]
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                owner.record("GradScaler.step", protocol="grad_scaler kwarg")
                retval = optimizer.step(*args, **dict(kwargs, grad_scaler=self))
                state["stage"] = _opt_state().STEPPED
                return retval
            if state["stage"] is _opt_state().READY:
                self.unscale_(optimizer)
            owner.record("GradScaler.step", protocol="host found_inf")
            retval = None
            if not sum(v.item() for v in state["found_inf_per_device"].values()):
                retval = optimizer.step(*args, **kwargs)
            state["stage"] = _opt_state().STEPPED
            return retval

        def state_dict(self):
            state = super().state_dict()
            if self._enabled:
                state["dynamic"] = self._dynamic
            return state

        def load_state_dict(self, state_dict):
            if not self._enabled:
                return
            if len(state_dict) == 0:
                raise RuntimeError("The source state dict is empty, possibly because it was saved "
                                   "from a disabled instance of GradScaler.")
            super().load_state_dict(state_dict)
            self._dynamic = state_dict["dynamic"]  # KeyError for torch's state, like the real class

    class _ShardedGradScaler(GradScaler):
        def __init__(self, device="npu", init_scale=2.0**16, backoff_factor=0.5, growth_factor=2.0,
                     growth_interval=2000, enabled=True, process_group=None):
            super().__init__(init_scale, growth_factor, backoff_factor, growth_interval, True, enabled)
            self._device = device

    GradScaler.__module__ = "torch_npu.npu.amp.grad_scaler"  # where the real classes live
    _ShardedGradScaler.__module__ = "torch_npu.npu.amp.sharded_grad_scaler"
    return GradScaler, _ShardedGradScaler


def _opt_state():
    from torch.amp.grad_scaler import OptState

    return OptState


class _FakeNpuNamespace:
    """What ``torch.npu`` / ``torch_npu.npu`` look like after importing torch_npu (recording)."""

    def __init__(self, owner: FakeTorchNpu, device_count: int, bf16: bool):
        self._owner = owner
        self._count = device_count
        self._bf16 = bf16
        self.config = _WriteOnlyConfig(owner)
        scaler, sharded = _make_grad_scalers(owner)
        self.amp = types.ModuleType("torch_npu.npu.amp")
        self.amp.GradScaler = scaler
        self.amp.sharded_grad_scaler = types.ModuleType("torch_npu.npu.amp.sharded_grad_scaler")
        self.amp.sharded_grad_scaler._ShardedGradScaler = sharded  # private; no public ShardedGradScaler

    def set_option(self, option):  # rule 5 / 8
        if not isinstance(option, dict):
            raise TypeError("npu option must be a dict.")
        allowed = {"ACL_PRECISION_MODE": ("allow_fp32_to_fp16", "must_keep_origin_dtype")}
        for name, value in option.items():
            if name in allowed and str(value) not in allowed[name]:
                raise ValueError(f"value of {name} should be in {list(allowed[name])} but got {value}")
        self._owner.record("set_option", option=dict(option))
        if "ACL_PRECISION_MODE" in option:
            self._owner.precision_mode = str(option["ACL_PRECISION_MODE"])

    def is_available(self):
        return self._count > 0

    def device_count(self):
        return self._count

    def current_device(self):
        return 0

    def get_soc_version(self):
        return self._owner.soc_version

    def get_device_name(self, index=0):
        self._owner.record("get_device_name", index=index)
        return SOC_NAMES.get(self._owner.soc_version, f"Ascend(soc {self._owner.soc_version})")

    def is_bf16_supported(self):
        return self._bf16

    def set_compile_mode(self, jit_compile=False):  # rule 5: torch_npu's default
        self._owner.record("set_compile_mode", jit_compile=jit_compile)

    def synchronize(self, device=None):
        self._owner.record("synchronize")

    def empty_cache(self):
        self._owner.record("empty_cache")

    def manual_seed_all(self, seed):
        self._owner.record("manual_seed_all", seed=seed)

    def max_memory_allocated(self, device=None):
        return 123456

    def reset_peak_memory_stats(self, device=None):
        self._owner.record("reset_peak_memory_stats")


# ------------------------------------------------------------------------------------------ rule 3
def _make_fused_adamw(owner: FakeTorchNpu):
    class NpuFusedAdamW(torch.optim.Optimizer):
        """torch_npu.optim.NpuFusedAdamW's contract; the update is the real class's AdamW maths."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
            if lr < 0.0 or eps < 0.0 or weight_decay < 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
                raise ValueError(f"Invalid NpuFusedAdamW arguments: lr={lr} eps={eps} betas={betas} wd={weight_decay}")
            self.init_args = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
            owner.record("NpuFusedAdamW.__init__", **self.init_args)
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))
            self.is_fused_optimizer = True
            self.combined = None  # [(param, group, grad view into the flat buffer)] once combined
            self.grads_all_group_combined = []

        def _combine(self):
            if self.combined is not None:
                return
            members, by_dtype = [], {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue  # never combined, so never stepped
                    if type(p).__name__ == "DTensor" or type(p.grad).__name__ == "DTensor":
                        raise RuntimeError("npu_combine_tensors: DTensor parameters are not supported "
                                           "(no DTensor sharding strategy for the fused optimizer)")
                    if p.dtype not in (torch.float32, torch.float16):
                        raise TypeError(f"Fused optimizer's parameters must be either float32 or float16, "
                                        f"but received {p.dtype}")
                    if not (_npu(p) and _npu(p.grad)):
                        raise RuntimeError(f"Tensors to combine must be on NPU, got {p.device.type}.")
                    if not (p.is_contiguous() and p.grad.is_contiguous()):
                        raise RuntimeError("Tensors to combine must be contiguous (npu_combine_tensors)")
                    members.append((p, group))
                    by_dtype.setdefault(p.dtype, []).append(p)
            if not members:
                return
            views = {}
            for dtype, params in by_dtype.items():
                flat = torch.cat([p.grad.detach().reshape(-1) for p in params])
                self.grads_all_group_combined.append(flat)
                offset = 0
                for p in params:
                    view = flat[offset:offset + p.numel()].view_as(p)
                    p.grad = view  # like npu_combine_tensors: the grad now lives in the flat buffer
                    views[p] = view
                    offset += p.numel()
            self.combined = [(p, group, views[p]) for p, group in members]
            owner.record("NpuFusedAdamW.combine", n_params=len(members))

        def get_combined_grads(self):
            self._combine()
            return self.grads_all_group_combined

        @torch.no_grad()
        def step(self, closure=None):
            loss = closure() if closure is not None else None
            self._combine()
            for p, group, grad in self.combined or []:
                if p.grad is not grad:
                    raise RuntimeError("NpuFusedAdamW: a parameter's .grad was replaced after the optimizer "
                                       "combined the gradients at its first step; the real class would keep "
                                       "stepping the old buffer and ignore the new gradient")
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                beta1, beta2 = group["betas"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bc1, bc2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                denom = (state["exp_avg_sq"].sqrt() / bc2**0.5).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bc1)
            return loss

        def zero_grad(self, set_to_none=False):
            owner.record("NpuFusedAdamW.zero_grad", set_to_none=set_to_none)
            if set_to_none:
                raise ValueError("set_to_none is not supported in fused optimizers")
            self._combine()
            if self.combined is None:
                super().zero_grad(set_to_none=False)
            for flat in self.grads_all_group_combined:
                flat.zero_()

        def clip_grad_norm_fused_(self, max_norm, norm_type=2):
            self._combine()
            flats = self.grads_all_group_combined
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(f.float(), norm_type) for f in flats]), norm_type)
            owner.record("clip_grad_norm_fused_", max_norm=max_norm, norm_type=norm_type, seen_norm=float(total))
            clip_coef = max_norm / (total + 1e-6)
            if clip_coef < 1:  # the real one decides on the host too
                for f in flats:
                    f.mul_(clip_coef)
            return total

    return NpuFusedAdamW


# ------------------------------------------------------------------------------------------ rule 6
def _refuse_channels_last(monkeypatch, fake: FakeTorchNpu) -> None:
    real_to, real_contiguous = torch.Tensor.to, torch.Tensor.contiguous

    def to(self, *args, **kwargs):
        fmt = kwargs.get("memory_format")
        target = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        to_npu = target is not None and str(target).startswith("npu")
        if fmt not in (None, torch.contiguous_format, torch.preserve_format) and (_npu(self) or to_npu):
            fake.record("refused", call="Tensor.to", memory_format=str(fmt))
            raise RuntimeError("Only contiguous_format or preserve_format is supported.")
        return real_to(self, *args, **kwargs)

    def contiguous(self, memory_format=torch.contiguous_format):
        if memory_format != torch.contiguous_format and _npu(self):
            fake.record("refused", call="Tensor.contiguous", memory_format=str(memory_format))
            raise RuntimeError("NPU contiguous operator only supported contiguous memory format.")
        return real_contiguous(self, memory_format=memory_format)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)


def _wrap_compute(monkeypatch, fake: FakeTorchNpu) -> None:
    """Rules 8 and 9: cube ops in fp16 under allow_fp32_to_fp16; SDPA through torch_npu's dispatch."""

    def lowered(name):
        real = _real[name]

        def op(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if (fake.precision_mode == "allow_fp32_to_fp16" and tensors and _npu(tensors[0])
                    and any(t.dtype == torch.float32 for t in tensors)):
                fake.record("fp32_to_fp16", op=name)
                cast = [a.half().float() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                        for a in args]
                return real(*cast, **kwargs).half().float()
            return real(*args, **kwargs)

        return op

    monkeypatch.setattr(torch, "matmul", lowered("matmul"))
    monkeypatch.setattr(torch, "bmm", lowered("bmm"))
    monkeypatch.setattr(torch, "baddbmm", lowered("baddbmm"))
    monkeypatch.setattr(torch.nn.functional, "linear", lowered("linear"))
    monkeypatch.setattr(torch.nn.functional, "conv2d", lowered("conv2d"))

    def sdpa(query, key, value, *args, **kwargs):
        if _npu(query):
            if args:
                raise TypeError("the stand-in's SDPA takes attn_mask/dropout_p/is_causal/scale by keyword")
            return fake.sdpa(query, key, value, **kwargs)
        return _real["sdpa"](query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


def install(monkeypatch, pretend_npu: bool = True, device_count: int = 1, bf16: bool = True,
            soc_version: int = SOC_910B2, version: str = "2.7.1.post8") -> FakeTorchNpu:
    """Install a fresh fake torch_npu for one test (see module docstring). Returns it."""
    # diffusers decides once, at import, whether torch_npu exists (and would then route GEGLU through
    # torch_npu.npu_geglu for the rest of the session), accelerate once per process: let both decide from the
    # real environment first. (The fake has no __spec__, so a library probing for it while installed fails.)
    from accelerate.utils import is_npu_available
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (their lazy imports probe too)
    from transformers import CLIPTextModel  # noqa: F401

    is_npu_available()  # accelerate caches its answer (lru_cache): take it from the real environment too

    from diffusers_npu import device as dev

    fake = FakeTorchNpu(device_count=device_count, bf16=bf16, soc_version=soc_version, version=version)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", fake.npu)
    monkeypatch.setitem(sys.modules, "torch_npu.npu.amp", fake.npu.amp)
    monkeypatch.setitem(sys.modules, "torch_npu.npu.amp.sharded_grad_scaler", fake.npu.amp.sharded_grad_scaler)
    monkeypatch.setattr(torch, "npu", fake.npu, raising=False)
    # rule 7: importing torch_npu replaces torch's FSDP scaler with its private one
    from torch.distributed.fsdp import sharded_grad_scaler

    monkeypatch.setattr(sharded_grad_scaler, "ShardedGradScaler", fake.npu.amp.sharded_grad_scaler._ShardedGradScaler)
    # Restored to the previous cache state at teardown; cleared now so get_torch_npu() finds the fake.
    monkeypatch.setattr(dev, "_torch_npu_cache", dev._UNSET)
    monkeypatch.setattr(dev, "_torch_npu_import_error", None)
    monkeypatch.setattr(dev, "_npu_facts", {})
    monkeypatch.delenv(dev.FUSION_ATTENTION_ENV, raising=False)
    # The seam: CPU tensors count as NPU tensors (pretend_npu), or report their real device (set explicitly,
    # so that a second install() in one test can switch back).
    monkeypatch.setattr(dev, "tensor_device_type", (lambda t: "npu" if t.device.type == "cpu" else t.device.type)
                        if pretend_npu else (lambda t: t.device.type))
    _refuse_channels_last(monkeypatch, fake)
    if pretend_npu:
        _wrap_compute(monkeypatch, fake)
    return fake


@pytest.fixture
def fake_npu(monkeypatch) -> FakeTorchNpu:
    """Fake torch_npu installed, CPU tensors reported as NPU tensors."""
    return install(monkeypatch)


@pytest.fixture
def no_npu(monkeypatch):
    """Make torch_npu unimportable (even if installed) for the duration of a test."""
    from diffusers_npu import device as dev

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` -> ImportError
    monkeypatch.setattr(dev, "_torch_npu_cache", dev._UNSET)
    monkeypatch.setattr(dev, "_torch_npu_import_error", None)
    monkeypatch.setattr(dev, "_npu_facts", {})


# ------------------------------------------------------------------------------------------------------------
# Added for the SD3 / FLUX work (issue #21 item 5), kept apart from the rules above.
#
# 8. ``npu_rms_norm(self, gamma, epsilon=1e-06) -> (Tensor, Tensor)``: ``self`` float16 / bfloat16 / float32
#    with 2-8 dimensions; ``gamma`` of the SAME dtype as ``self`` ("数据类型需要和self保持一致"), its shape
#    the trailing dimensions of ``self``; returns the normalised tensor and 1/Rms(x) (op-plugin
#    ``docs/context/（beta）torch_npu-npu_rms_norm.md``, function prototype and 参数说明).
# 9. ``torch_npu.npu.get_device_properties(device)`` returns the device's properties with ``total_memory``
#    in bytes (torch_npu/npu/utils.py, the CUDA-compatible API).

def _npu_rms_norm(self, x, gamma, epsilon=1e-06):
    if not (_npu(x) and _npu(gamma)):
        raise RuntimeError("npu_rms_norm: expected NPU tensors")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"npu_rms_norm: self must be float16, bfloat16 or float32, got {x.dtype}")
    if gamma.dtype != x.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} must equal self dtype {x.dtype}")
    if not 2 <= x.dim() <= 8:
        raise ValueError(f"npu_rms_norm: self must have 2-8 dimensions, got {x.dim()}")
    if tuple(gamma.shape) != tuple(x.shape[x.dim() - gamma.dim():]):
        raise ValueError(f"npu_rms_norm: gamma shape {tuple(gamma.shape)} is not a trailing shape of {tuple(x.shape)}")
    self.record("npu_rms_norm", dtype=x.dtype, shape=tuple(x.shape), epsilon=epsilon)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd).to(x.dtype) * gamma, rstd


FakeTorchNpu.npu_rms_norm = _npu_rms_norm
_FakeNpuNamespace.get_device_properties = lambda self, device=None: types.SimpleNamespace(
    total_memory=64 * 1024 ** 3, name="Ascend910B2")
