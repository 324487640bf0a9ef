"""A small RECORDING stand-in for ``torch_npu``, for contract tests on machines without an Ascend NPU.

It is not a simulator. It records how the project calls the torch_npu APIs it uses, enforces the
documented input contracts (see /work/shared/reference/npu-notes.md) and computes true results with
reference maths, so that end-to-end outputs can be checked against float64 references:

* ``npu_fusion_attention``: records layout, head_num, scale, keep_prob, q/k/v shapes and dtypes and the
  mask (dtype, shape, a copy); rejects fp32 inputs and non-bool masks like the real kernel; computes
  attention in float64 honouring the kernel's polarity (mask True = masked OUT).
* ``optim.NpuFusedAdamW``: torch AdamW maths; records construction args; ``zero_grad(set_to_none=True)``
  raises ValueError like the real one; ``clip_grad_norm_fused_`` records the gradient norm it saw.
* ``npu_apply_adam_w``: the real update rule, including the kernel's "multiply the beta powers by beta
  once more" convention, written in place into ``out=(param, exp_avg, exp_avg_sq)``.
* ``torch.npu``-style namespace (``is_available``, ``device_count``, ``synchronize``, ``config`` ...).

Use ``install(monkeypatch)`` (or the ``fake_npu`` fixture) in a test::

    from fake_torch_npu import install
    def test_x(monkeypatch):
        fake = install(monkeypatch)             # torch_npu importable, torch.npu present, CPU tensors
        ...                                     # count as "npu" for diffusers_npu's device decisions
        assert fake.calls_named("npu_fusion_attention")

``install`` (all undone at test teardown by monkeypatch):
  1. ``sys.modules['torch_npu'] = fake`` and ``torch.npu = fake.npu`` (the namespace torch_npu registers);
  2. clears ``diffusers_npu.device``'s cached torch_npu import, so ``get_torch_npu()`` returns the fake;
  3. with ``pretend_npu=True`` (default) patches ``diffusers_npu.device.tensor_device_type`` so that CPU
     tensors report device type ``"npu"`` -- the one seam attention processors and optimizers use to
     choose their NPU paths.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Dict, List

import pytest
import torch

_HALF = (torch.float16, torch.bfloat16)


class FakeTorchNpu(types.ModuleType):
    """Fresh per test; ``calls`` is the ordered record of every call into the fake."""

    def __init__(self, device_count: int = 1, bf16: bool = True):
        super().__init__("torch_npu")
        self.__file__ = __file__
        self.calls: List[Dict[str, Any]] = []
        self.npu = _FakeNpuNamespace(self, device_count, bf16)
        self.optim = types.SimpleNamespace(NpuFusedAdamW=_make_fused_adamw(self))

    # -- recording helpers -------------------------------------------------------------------------
    def record(self, name: str, **info) -> Dict[str, Any]:
        entry = {"name": name, **info}
        self.calls.append(entry)
        return entry

    def calls_named(self, name: str) -> List[Dict[str, Any]]:
        return [c for c in self.calls if c["name"] == name]

    # -- kernels -----------------------------------------------------------------------------------
    def npu_fusion_attention(
        self_,  # noqa: N805 - bound to the module instance
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=2147483647,
        next_tockens=2147483647,
        inner_precise=0,
        prefix=None,
        actual_seq_qlen=None,
        actual_seq_kvlen=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
    ):
        self_.record(
            "npu_fusion_attention",
            input_layout=input_layout,
            head_num=head_num,
            scale=scale,
            keep_prob=keep_prob,
            pre_tockens=pre_tockens,
            next_tockens=next_tockens,
            sparse_mode=sparse_mode,
            pse=pse,
            q_shape=tuple(query.shape),
            k_shape=tuple(key.shape),
            v_shape=tuple(value.shape),
            dtypes=(query.dtype, key.dtype, value.dtype),
            mask_dtype=None if atten_mask is None else atten_mask.dtype,
            mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
            mask=None if atten_mask is None else atten_mask.detach().clone(),
        )
        # Contracts of the real kernel.
        for t in (query, key, value):
            if t.dtype not in _HALF:
                raise TypeError(f"npu_fusion_attention only supports float16/bfloat16, got {t.dtype}")
        if input_layout != "BNSD":
            raise NotImplementedError(f"fake npu_fusion_attention only models BNSD, got {input_layout!r}")
        if query.dim() != 4 or query.shape[1] != head_num or key.shape[1] != head_num:
            raise ValueError(f"BNSD expects (B, {head_num}, S, D); got q{tuple(query.shape)} k{tuple(key.shape)}")
        if atten_mask is not None and atten_mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"atten_mask must be bool/uint8 (1 = masked out), got {atten_mask.dtype}")
        if keep_prob != 1.0:
            raise NotImplementedError("fake npu_fusion_attention does not model dropout")
        # Reference maths in float64. Kernel polarity: True/1 = masked OUT.
        scores = torch.matmul(query.double(), key.double().transpose(-1, -2)) * float(scale)
        if atten_mask is not None:
            scores = scores.masked_fill(atten_mask.bool(), float("-inf"))
        out = torch.matmul(scores.softmax(-1), value.double()).to(query.dtype)
        b, n, s, _ = query.shape
        softmax_stats = torch.zeros(b, n, s, 8)
        return out, softmax_stats, softmax_stats.clone(), torch.zeros(()), 0, 0, 0

    def npu_apply_adam_w(
        self, beta1_power, beta2_power, lr, weight_decay, beta1, beta2, eps, grad, max_grad_norm, amsgrad, maximize, out
    ):
        var, m, v = out
        self.record(
            "npu_apply_adam_w",
            beta1_power=beta1_power,
            beta2_power=beta2_power,
            lr=lr,
            weight_decay=weight_decay,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            max_grad_norm=max_grad_norm,
            amsgrad=amsgrad,
            maximize=maximize,
            shape=tuple(var.shape),
        )
        if amsgrad or maximize:
            raise NotImplementedError("fake npu_apply_adam_w models amsgrad=False, maximize=False only")
        with torch.no_grad():
            # The kernel's own convention: it advances the powers by one step before bias-correcting.
            b1p = beta1_power * beta1
            b2p = beta2_power * beta2
            g = grad.to(var.dtype)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            var.mul_(1 - lr * weight_decay)
            denom = (v / (1 - b2p)).sqrt().add_(eps)
            var.addcdiv_(m, denom, value=-lr / (1 - b1p))
        return var, m, v


class _FakeConfig:
    def __init__(self, owner):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "allow_internal_format", True)

    def __setattr__(self, name, value):
        self._owner.record("torch.npu.config.set", attr=name, value=value)
        object.__setattr__(self, name, value)


class _FakeNpuNamespace:
    """What ``torch.npu`` / ``torch_npu.npu`` look like after importing torch_npu (recording)."""

    def __init__(self, owner: FakeTorchNpu, device_count: int, bf16: bool):
        self._owner = owner
        self._count = device_count
        self._bf16 = bf16
        self.config = _FakeConfig(owner)

    def is_available(self):
        return self._count > 0

    def device_count(self):
        return self._count

    def current_device(self):
        return 0

    def get_device_name(self, index=0):
        self._owner.record("get_device_name", index=index)
        return "Ascend910B (fake)"

    def is_bf16_supported(self):
        return self._bf16

    def set_compile_mode(self, jit_compile=True):
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


def _make_fused_adamw(owner: FakeTorchNpu):
    class NpuFusedAdamW(torch.optim.AdamW):
        """Fake of torch_npu.optim.NpuFusedAdamW: AdamW maths, the real class's call contract."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False):
            params = list(params)
            for p in (t for g in params for t in (g["params"] if isinstance(g, dict) else [g])):
                if p.dtype not in (torch.float32, torch.float16):
                    raise TypeError(f"Fused optimizer's parameters must be either float32 or float16, but received {p.dtype}")
            self.init_args = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
            owner.record("NpuFusedAdamW.__init__", **self.init_args)
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=False)
            self.is_fused_optimizer = True

        def zero_grad(self, set_to_none=False):
            owner.record("NpuFusedAdamW.zero_grad", set_to_none=set_to_none)
            if set_to_none:
                raise ValueError("set_to_none is not supported in fused optimizers")
            super().zero_grad(set_to_none=False)

        def clip_grad_norm_fused_(self, max_norm, norm_type=2):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float(), norm_type) for g in grads]), norm_type)
            owner.record("clip_grad_norm_fused_", max_norm=max_norm, norm_type=norm_type, seen_norm=float(total))
            clip_coef = max_norm / (total + 1e-6)
            if clip_coef < 1:
                for g in grads:
                    g.mul_(clip_coef)
            return total

    return NpuFusedAdamW


def install(monkeypatch, pretend_npu: bool = True, device_count: int = 1, bf16: bool = True) -> FakeTorchNpu:
    """Install a fresh fake torch_npu for one test (see module docstring). Returns it."""
    from diffusers_npu import device as dev

    fake = FakeTorchNpu(device_count=device_count, bf16=bf16)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", fake.npu, raising=False)
    # Restored to the previous cache state at teardown; cleared now so get_torch_npu() finds the fake.
    monkeypatch.setattr(dev, "_torch_npu_cache", dev._UNSET)
    monkeypatch.setattr(dev, "_torch_npu_import_error", None)
    if pretend_npu:
        monkeypatch.setattr(dev, "tensor_device_type", lambda t: "npu" if t.device.type == "cpu" else t.device.type)
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
