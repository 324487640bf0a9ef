"""A strict RECORDING stand-in for ``torch_npu``, for contract tests on machines without an Ascend NPU.

It is not a simulator: it records how the project calls torch_npu, computes true results with reference
maths (so outputs can be checked against float64 references), and REFUSES every call the real API refuses
that the project could plausibly make. Each rule below names its source; tests/test_device.py,
test_attention.py and test_optim.py hold one rejecting test per rule (``test_stand_in_rejects_*``).

Rules (sources: Ascend/pytorch = torch_npu, Ascend/op-plugin = its operator docs):

1. ``npu_fusion_attention``: q/k/v fp16 or bf16 of one dtype (older op-plugin docs; fp32 was added later,
   so refusing it is the strict side); layout BNSD is the only one modelled; ``head_num`` = N of q and k;
   k and v the same shape; head dim <= 768; ``atten_mask`` bool/uint8 (True = masked OUT) of shape BNSS,
   B1SS, 11SS or SS exactly -- ``[B,1,1,S]`` is refused ("get unsupported atten_mask shape", quoted in
   huggingface/diffusers#13490); only on the SoCs of ``diffusers_npu.device._FUSION_ATTENTION_SOC``
   (torch_npu-npu_fusion_attention.md: "Atlas A2 训练系列产品"; CANN's aclnn page: "Atlas 训练系列产品
   不支持该算子").
2. ``npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
   max_grad_norm=None, amsgrad=None, maximize=None, *, out)``: the 7th argument is ``epsilon`` and ``out``
   is keyword-only (op-plugin schema ``npu_apply_adam_w.out(..., Scalar epsilon, ..., *, Tensor(a!) var,
   ...)``); var/m/v/grad of one shape; amsgrad=True needs max_grad_norm and is unsupported
   (torch_npu-npu_apply_adam_w.md). The kernel bias-corrects with ``beta_power * beta``.
3. ``optim.NpuFusedAdamW`` (torch_npu/optim/npu_fused_adamw.py, npu_fused_optim_base.py): default
   ``weight_decay=1e-2``; at the first step / zero_grad / clip it combines the parameters that HAVE a
   gradient at that moment into one flat buffer per dtype -- fp32/fp16 only (TypeError), contiguous NPU
   tensors (npu_combine_tensors: "须全部为内存连续的、dtype相同的NPU Tensor") -- and from then on steps those
   parameters only, from that buffer: a parameter whose grad was None then is never updated, and a
   ``p.grad`` replaced later is ignored; ``zero_grad(set_to_none=True)`` raises ValueError.
4. ``torch.npu.config.allow_internal_format`` is write-only: torch_npu's ``npuConfig`` defines only
   ``__setattr__`` (torch_npu/npu/npu_config.py), so reading it raises AttributeError. Writes are recorded.
5. ``set_compile_mode(jit_compile=False)``: the default is False (npu_config.py).
6. channels_last on an NPU tensor is refused: ``Tensor.to(memory_format=channels_last)`` -> "Only
   contiguous_format or preserve_format is supported." (torch_npu's _to_copy TORCH_CHECK, which
   ``Module.to(memory_format=...)`` reaches), ``.contiguous(memory_format=channels_last)`` -> "NPU contiguous
   operator only supported contiguous memory format."
7. ``torch.npu.amp.GradScaler(init_scale, growth_factor, backoff_factor, growth_interval, dynamic,
   enabled)`` takes no device argument and scales NPU tensors only (torch_npu/npu/amp/grad_scaler.py);
   the sharded one lives in ``torch_npu.npu.amp.sharded_grad_scaler`` (sharded_grad_scaler.py).

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


def _npu(tensor) -> bool:
    from diffusers_npu import device as dev

    return dev.tensor_device_type(tensor) == "npu"


class FakeTorchNpu(types.ModuleType):
    """Fresh per test; ``calls`` is the ordered record of every call into the fake."""

    def __init__(self, device_count: int = 1, bf16: bool = True, soc_version: int = SOC_910B2):
        super().__init__("torch_npu")
        self.__file__ = __file__
        self.calls: List[Dict[str, Any]] = []
        self.soc_version = soc_version
        self.npu = _FakeNpuNamespace(self, device_count, bf16)
        self.optim = types.SimpleNamespace(NpuFusedAdamW=_make_fused_adamw(self))

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
            pse=pse, q_shape=tuple(query.shape), k_shape=tuple(key.shape), v_shape=tuple(value.shape),
            dtypes=(query.dtype, key.dtype, value.dtype),
            mask_dtype=None if atten_mask is None else atten_mask.dtype,
            mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
            mask=None if atten_mask is None else atten_mask.detach().clone())
        from diffusers_npu import device as dev

        soc = dev._SOC_NAMES.get(self_.soc_version, str(self_.soc_version))
        if not dev._FUSION_ATTENTION_SOC.match(soc):
            raise RuntimeError(f"npu_fusion_attention: FlashAttentionScore is not supported on {soc}")
        if query.dtype not in _HALF or key.dtype != query.dtype or value.dtype != query.dtype:
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
        scores = torch.matmul(query.double(), key.double().transpose(-1, -2)) * float(scale)
        if atten_mask is not None:
            scores = scores.masked_fill(atten_mask.bool(), float("-inf"))
        out = torch.matmul(scores.softmax(-1), value.double()).to(query.dtype)
        stats = torch.zeros(b, n, sq, 8)
        return out, stats, stats.clone(), torch.zeros(()), 0, 0, 0

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
        if amsgrad:
            raise RuntimeError("npu_apply_adam_w: amsgrad is only supported as False"
                               + ("" if max_grad_norm is not None else " (and needs max_grad_norm)"))
        with torch.no_grad():
            b1p, b2p = beta1_power * beta1, beta2_power * beta2  # the kernel's convention
            g = (-grad if maximize else grad).to(var.dtype)
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
        """torch_npu.npu.amp.GradScaler: NPU-only, no device argument (rule 7); CPU maths underneath."""

        def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                     dynamic=True, enabled=True):
            if not isinstance(init_scale, (int, float)):
                raise TypeError(f"init_scale must be a number, got {init_scale!r} (this scaler takes no device)")
            owner.record(type(self).__name__, init_scale=init_scale, enabled=enabled, dynamic=dynamic)
            super().__init__("cpu", init_scale=init_scale, growth_factor=growth_factor,
                             backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)

        def scale(self, outputs):
            for t in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
                if isinstance(t, torch.Tensor) and not _npu(t):
                    raise ValueError("Device type of outputs should be npu.")
            return super().scale(outputs)

    class ShardedGradScaler(GradScaler):
        def __init__(self, init_scale=2.0**16, backoff_factor=0.5, growth_factor=2.0, growth_interval=2000,
                     enabled=True, process_group=None):
            super().__init__(init_scale, growth_factor, backoff_factor, growth_interval, True, enabled)

    return GradScaler, ShardedGradScaler


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
        self.amp.sharded_grad_scaler.ShardedGradScaler = sharded

    def is_available(self):
        return self._count > 0

    def device_count(self):
        return self._count

    def current_device(self):
        return 0

    def get_soc_version(self):
        return self._owner.soc_version

    def get_device_name(self, index=0):
        from diffusers_npu import device as dev

        self._owner.record("get_device_name", index=index)
        return dev._SOC_NAMES.get(self._owner.soc_version, f"Ascend(soc {self._owner.soc_version})")

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


def install(monkeypatch, pretend_npu: bool = True, device_count: int = 1, bf16: bool = True,
            soc_version: int = SOC_910B2) -> FakeTorchNpu:
    """Install a fresh fake torch_npu for one test (see module docstring). Returns it."""
    # diffusers decides once, at import, whether torch_npu exists (and would then route GEGLU through
    # torch_npu.npu_geglu for the rest of the session), accelerate once per process: let both decide from the
    # real environment first. (The fake has no __spec__, so a library probing for it while installed fails.)
    from accelerate.utils import is_npu_available
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (their lazy imports probe too)
    from transformers import CLIPTextModel  # noqa: F401

    is_npu_available()  # accelerate caches its answer (lru_cache): take it from the real environment too

    from diffusers_npu import device as dev

    fake = FakeTorchNpu(device_count=device_count, bf16=bf16, soc_version=soc_version)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", fake.npu)
    monkeypatch.setitem(sys.modules, "torch_npu.npu.amp", fake.npu.amp)
    monkeypatch.setitem(sys.modules, "torch_npu.npu.amp.sharded_grad_scaler", fake.npu.amp.sharded_grad_scaler)
    monkeypatch.setattr(torch, "npu", fake.npu, raising=False)
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
