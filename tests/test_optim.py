"""Optimizers track float64 torch AdamW; clipping sees unscaled gradients; NPU paths via the fake."""
from __future__ import annotations

import importlib.util
import os
import secrets

import pytest
import torch
from torch import nn

from diffusers_npu import optim as O
from diffusers_npu.optim import (build_optimizer, clip_grad_norm, optimizer_name_from_flags, supports_sync_free_amp,
                                 zero_grad)
from fake_torch_npu import install

LR, BETAS, EPS, WD, STEPS = 1e-2, (0.9, 0.99), 1e-8, 0.1, 20
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture
def seed():
    s = int(os.environ.get("DIFFUSERS_NPU_TEST_SEED") or secrets.randbelow(2**31))
    print(f"DIFFUSERS_NPU_TEST_SEED={s}")
    torch.manual_seed(s)
    return s


def small_model():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def set_grad(p, g):
    """Write a gradient the way backward() does: into the existing .grad when there is one (NpuFusedAdamW
    steps from the buffer its grads were combined into, and ignores a replaced .grad)."""
    if p.grad is None:
        p.grad = g.to(p.dtype)
    else:
        p.grad.copy_(g)


def run_against_reference(opt_factory, seed, steps=STEPS):
    """Step `opt_factory(params)` and float64 torch AdamW on identical random gradients."""
    model = small_model()
    ref_params = [p.detach().double().clone().requires_grad_(True) for p in model.parameters()]
    ref_opt = torch.optim.AdamW(ref_params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    params = list(model.parameters())
    initial = [p.detach().double().clone() for p in params]
    opt = opt_factory(params)
    for _ in range(steps):
        for p, r in zip(params, ref_params):
            g = torch.randn(p.shape, dtype=torch.float64)
            r.grad = g.clone()
            set_grad(p, g)
        opt.step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(params, ref_params)):
        err = rel(p.detach(), r.detach())
        assert err < 1e-6, f"param {i}: relative error {err:.2e} vs float64 AdamW (seed {seed})"
        # The parameters really moved, so agreeing with the reference means something.
        assert rel(r.detach(), initial[i]) > 1e-2
    return opt


def factory(name):
    return lambda params: build_optimizer(name, params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)


# ------------------------------------------------------------------------------ tracking AdamW
@pytest.mark.parametrize("name", ["adamw", "fused_adamw", "megatron_adamw"])
def test_tracks_float64_adamw(name, seed):
    opt = run_against_reference(factory(name), seed)
    if name == "adamw":
        assert type(opt) is torch.optim.AdamW and opt.defaults["foreach"] is True
    elif name == "fused_adamw":
        assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True  # CPU fused kernel (torch>=2.4)
    else:
        assert type(opt) is O.MegatronAdamW


def test_megatron_adamw_npu_kernel_tracks_reference(monkeypatch, seed):
    fake = install(monkeypatch)
    opt = run_against_reference(factory("megatron_adamw"), seed)
    calls = fake.calls_named("npu_apply_adam_w")
    n_params = len(opt.param_groups[0]["params"])
    assert len(calls) == STEPS * n_params
    first, second = calls[0], calls[n_params]
    # Kernel convention: it multiplies the powers by beta itself, so step t passes beta**(t-1).
    assert (first["beta1_power"], first["beta2_power"]) == (1.0, 1.0)
    assert second["beta1_power"] == pytest.approx(BETAS[0]) and second["beta2_power"] == pytest.approx(BETAS[1])
    assert (first["lr"], first["weight_decay"], first["beta1"], first["beta2"], first["eps"]) == (LR, WD, *BETAS, EPS)
    assert (first["max_grad_norm"], first["amsgrad"], first["maximize"]) == (None, False, False)


def test_fused_adamw_on_npu_builds_npu_fused(monkeypatch, seed):
    fake = install(monkeypatch)
    opt = run_against_reference(factory("fused_adamw"), seed)
    assert type(opt).__name__ == "NpuFusedAdamW"
    assert fake.calls_named("NpuFusedAdamW.__init__") == [
        {"name": "NpuFusedAdamW.__init__", "lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WD, "amsgrad": False}
    ]


def test_npu_paths_follow_param_device_not_global(monkeypatch):
    """torch_npu present, but these params are not NPU params: no NPU optimizer."""
    fake = install(monkeypatch, pretend_npu=False)
    opt = build_optimizer("fused_adamw", small_model().parameters(), lr=LR)
    assert type(opt) is torch.optim.AdamW
    m = small_model()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    build_optimizer("megatron_adamw", m.parameters(), lr=LR).step()
    assert fake.calls == []


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_adamw_8bit_builds(seed):  # pragma: no cover - depends on the environment
    opt = build_optimizer("adamw_8bit", small_model().parameters(), lr=LR)
    assert "8bit" in type(opt).__name__


def test_adamw_8bit_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer("adamw_8bit", small_model().parameters(), lr=LR)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="'sgd'.*adamw, fused_adamw, megatron_adamw, adamw_8bit"):
        build_optimizer("sgd", small_model().parameters(), lr=LR)


def test_fused_fallback_warns(monkeypatch):
    real = O._torch_adamw

    def no_fused(params, lr, betas, eps, wd, **impl):
        if impl.get("fused"):
            raise RuntimeError("fused not supported here")
        return real(params, lr, betas, eps, wd, **impl)

    monkeypatch.setattr(O, "_torch_adamw", no_fused)
    with pytest.warns(UserWarning, match="fused AdamW is unavailable.*fused not supported here"):
        opt = build_optimizer("fused_adamw", small_model().parameters(), lr=LR)
    assert opt.defaults["foreach"] is True


def test_param_groups_and_generators():
    m = small_model()
    groups = [{"params": (p for p in m[0].parameters()), "weight_decay": 0.0}, {"params": m[2].parameters()}]
    opt = build_optimizer("megatron_adamw", groups, lr=LR)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 1e-2


def test_megatron_state_dict_roundtrip(seed):
    m = small_model()
    opt = build_optimizer("megatron_adamw", m.parameters(), lr=LR)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt2 = build_optimizer("megatron_adamw", m.parameters(), lr=LR)
    opt2.load_state_dict(opt.state_dict())
    p0 = next(m.parameters())
    assert opt2.state[p0]["step"] == 1 and torch.equal(opt2.state[p0]["exp_avg"], opt.state[p0]["exp_avg"])
    # A checkpoint of an earlier release kept the step as a Python int: it resumes, as the same step.
    old = opt.state_dict()
    for state in old["state"].values():
        state["step"] = int(state["step"])
    opt3 = build_optimizer("megatron_adamw", m.parameters(), lr=LR)
    opt3.load_state_dict(old)
    opt.step()
    opt3.step()
    assert float(opt3.state[p0]["step"]) == 2 and torch.equal(opt3.state[p0]["exp_avg"], opt.state[p0]["exp_avg"])


# ------------------------------------------------------------------------------- flags / zero_grad
def test_optimizer_name_from_flags():
    assert optimizer_name_from_flags(False, False) == "adamw"
    assert optimizer_name_from_flags(True, False) == "megatron_adamw"
    assert optimizer_name_from_flags(False, True) == "fused_adamw"
    assert optimizer_name_from_flags(False, False, use_8bit_adam=True) == "adamw_8bit"
    with pytest.raises(ValueError, match="mutually exclusive.*megatron_adamw \\+ fused_adamw"):
        optimizer_name_from_flags(True, True)


def test_zero_grad_with_npu_fused(monkeypatch):
    fake = install(monkeypatch)
    m = small_model()
    opt = build_optimizer("fused_adamw", m.parameters(), lr=LR)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="set_to_none is not supported"):
        opt.zero_grad(set_to_none=True)  # the fake behaves like the real one
    zero_grad(opt)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    assert [c["set_to_none"] for c in fake.calls_named("NpuFusedAdamW.zero_grad")] == [True, False]


def test_zero_grad_fallback_and_plain():
    class Refuses(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            if set_to_none:
                raise RuntimeError("no set_to_none here")
            super().zero_grad(set_to_none=False)

    m = small_model()
    for cls, expect_none in ((Refuses, False), (torch.optim.SGD, True)):
        opt = cls(m.parameters(), lr=0.1)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        zero_grad(opt)
        assert all((p.grad is None) == expect_none for p in m.parameters()), cls


# ------------------------------------------------------------------------------------ clipping
KNOWN_NORM = 5.0


def known_grad_setup(dtype_autocast=torch.float16):
    """Linear(4->3, no bias) whose weight gradient is exactly known: dL/dW = ones(3,1) @ x.sum(0)."""
    lin = nn.Linear(4, 3, bias=False)
    # x.sum(0) = [1, 2, 2, 0]*a with a chosen so that ||grad|| = sqrt(3) * 3a = KNOWN_NORM.
    a = KNOWN_NORM / (3 * 3**0.5)
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0]]) * a

    def loss_fn():
        with torch.autocast("cpu", dtype=dtype_autocast):
            y = lin(x)
        return y.float().sum()

    return lin, loss_fn


def grad_norm(params):
    return float(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params])))


def test_clip_plain():
    lin, loss_fn = known_grad_setup()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss_fn().backward()
    norm = clip_grad_norm(opt, lin.parameters(), 1.0)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0 and norm.device == lin.weight.device
    assert float(norm) == pytest.approx(KNOWN_NORM, rel=1e-3)
    assert grad_norm(lin.parameters()) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("fused", [False, True], ids=["torch_opt", "npu_fused"])
def test_clip_with_gradscaler_sees_unscaled_grads(fused, monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    lin, loss_fn = known_grad_setup()
    if fused:
        fake = install(monkeypatch)
    opt = build_optimizer("fused_adamw" if fused else "adamw", lin.parameters(), lr=1e-3)
    scaler.scale(loss_fn()).backward()
    assert grad_norm(lin.parameters()) == pytest.approx(KNOWN_NORM * 1024, rel=1e-3)  # really scaled

    norm = clip_grad_norm(opt, lin.parameters(), 1.0, scaler=scaler)
    assert float(norm) == pytest.approx(KNOWN_NORM, rel=1e-3), "clip measured scaled gradients"
    assert grad_norm(lin.parameters()) == pytest.approx(1.0, rel=1e-3)
    if fused:
        (call,) = fake.calls_named("clip_grad_norm_fused_")
        assert call["seen_norm"] == pytest.approx(KNOWN_NORM, rel=1e-3) and call["max_norm"] == 1.0
    before = lin.weight.detach().clone()
    scaler.step(opt)  # must not complain about a double unscale, and must take the step
    scaler.update()
    assert not torch.equal(before, lin.weight.detach())


def test_the_original_port_bug_is_real(monkeypatch):
    """Calling clip_grad_norm_fused_ directly under a scaler measures norm * scale (why we unscale)."""
    fake = install(monkeypatch)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    lin, loss_fn = known_grad_setup()
    opt = build_optimizer("fused_adamw", lin.parameters(), lr=1e-3)
    scaler.scale(loss_fn()).backward()
    opt.clip_grad_norm_fused_(1.0)
    assert fake.calls_named("clip_grad_norm_fused_")[0]["seen_norm"] == pytest.approx(KNOWN_NORM * 1024, rel=1e-3)


def test_clip_tolerates_prior_unscale():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    lin, loss_fn = known_grad_setup()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    scaler.scale(loss_fn()).backward()
    scaler.unscale_(opt)
    assert float(clip_grad_norm(opt, lin.parameters(), 1.0, scaler=scaler)) == pytest.approx(KNOWN_NORM, rel=1e-3)


@pytest.fixture
def fp16_accelerator():
    """accelerate's fp16 setup as on a GPU: Accelerator(mixed_precision='fp16') with a GradScaler.

    On CPU accelerate builds no scaler (native_amp is False), so a CPU GradScaler is attached before
    prepare(); everything after that -- backward(), clip_grad_norm_/unscale_gradients, the wrapped
    optimizer's scaler.step -- is accelerate's own code path.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc.native_amp = True
    yield acc
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("fused", [False, True], ids=["torch_opt", "npu_fused"])
def test_clip_with_accelerator_sees_unscaled_grads(fused, fp16_accelerator, monkeypatch):
    acc = fp16_accelerator
    lin, loss_fn = known_grad_setup()
    if fused:
        fake = install(monkeypatch)
    opt = build_optimizer("fused_adamw" if fused else "adamw", lin.parameters(), lr=1e-3)
    lin, opt = acc.prepare(lin, opt)
    acc.backward(loss_fn())
    assert grad_norm(lin.parameters()) == pytest.approx(KNOWN_NORM * 1024, rel=1e-3)

    norm = clip_grad_norm(opt, lin.parameters(), 1.0, accelerator=acc)
    assert float(norm) == pytest.approx(KNOWN_NORM, rel=1e-3)
    assert grad_norm(lin.parameters()) == pytest.approx(1.0, rel=1e-3)
    if fused:
        assert fake.calls_named("clip_grad_norm_fused_")[0]["seen_norm"] == pytest.approx(KNOWN_NORM, rel=1e-3)
    before = next(lin.parameters()).detach().clone()
    opt.step()
    assert not torch.equal(before, next(lin.parameters()).detach())
    zero_grad(opt)  # AcceleratedOptimizer-wrapped fused optimizer must not raise


def test_clip_rejects_two_scalers(fp16_accelerator):
    with pytest.raises(ValueError, match="either accelerator= or scaler="):
        clip_grad_norm(None, [], 1.0, accelerator=fp16_accelerator, scaler=torch.amp.GradScaler("cpu"))


# ------------------------------------------------------------------------- no host synchronisation
class HostReads:
    """Count (and forbid) the ways a tensor's value reaches the host: item, float, bool, tolist."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("item", "__float__", "__bool__", "tolist"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._spy(name, real))

    def _spy(self, name, real):
        def spy(t, *a, **k):
            self.calls.append(name)
            return real(t, *a, **k)
        return spy


def scaled_step(opt_name, grad_scale_overflow, monkeypatch, clip=True):
    """One fp16 GradScaler step (optionally with a non-finite gradient and a clip); returns what it read."""
    lin, loss_fn = known_grad_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = build_optimizer(opt_name, lin.parameters(), lr=1e-2, grad_scaling=True)
    scaler.scale(loss_fn()).backward()
    if grad_scale_overflow:
        lin.weight.grad[0, 0] = float("inf")
    reads = HostReads(monkeypatch)
    if clip:
        norm = clip_grad_norm(opt, lin.parameters(), 1.0, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    monkeypatch.undo()
    return reads.calls, lin, opt, scaler, (norm if clip else None)


@pytest.mark.parametrize("name", ["adamw", "fused_adamw", "megatron_adamw"])
def test_grad_scaling_optimizers_step_without_host_reads(name, monkeypatch):
    reads, lin, opt, scaler, norm = scaled_step(name, False, monkeypatch)
    assert supports_sync_free_amp(opt)
    assert reads == [], f"{name}: the fp16 step read {reads} on the host"
    assert float(norm) == pytest.approx(KNOWN_NORM, rel=1e-3) and scaler.get_scale() == 1024.0


def test_foreach_adamw_under_a_scaler_does_read_the_host(monkeypatch):
    """Why build_optimizer(grad_scaling=True) swaps the implementation: the foreach one makes the scaler wait."""
    lin, loss_fn = known_grad_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = build_optimizer("adamw", lin.parameters(), lr=1e-2)
    assert opt.defaults["foreach"] is True and not supports_sync_free_amp(opt)
    scaler.scale(loss_fn()).backward()
    reads = HostReads(monkeypatch)
    scaler.step(opt)
    monkeypatch.undo()
    assert "item" in reads.calls


@pytest.mark.parametrize("name", ["fused_adamw", "megatron_adamw"])
def test_overflow_step_is_skipped_on_the_device(name, monkeypatch):
    reads, lin, opt, scaler, _ = scaled_step(name, True, monkeypatch, clip=False)
    assert reads == []
    before = lin.weight.detach().clone()
    assert scaler.get_scale() == 512.0  # halved
    state = opt.state[lin.weight]
    assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    # The next, finite step trains, as a first step (bias correction of step 1).
    lin.weight.grad = torch.full_like(lin.weight, 512.0)  # = 1.0 once unscaled
    scaler.step(opt)
    scaler.update()
    assert float(state["step"]) == 1
    expected = before * (1 - 1e-2 * 1e-2) - 1e-2 * torch.ones_like(before)  # AdamW step 1: lr * m_hat/sqrt(v_hat)
    assert torch.allclose(lin.weight.detach(), expected, atol=1e-5)


def test_megatron_with_skips_tracks_float64_reference(seed):
    """Skipped steps leave no trace: megatron under a scaler with two overflows == AdamW on the other steps."""
    model = small_model()
    params = list(model.parameters())
    ref_params = [p.detach().double().clone().requires_grad_(True) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    opt = build_optimizer("megatron_adamw", params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, grad_scaling=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    scaler.scale(torch.ones(()))  # creates the scale tensor, as the loss scaling of a real step would
    for step in range(12):
        scale = scaler.get_scale()
        for p, r in zip(params, ref_params):
            g = torch.randn(p.shape, dtype=torch.float64)
            set_grad(p, g * scale)
            r.grad = g
        if step in (3, 7):
            params[0].grad.view(-1)[0] = float("nan")
        scaler.step(opt)
        scaler.update()
        if step not in (3, 7):
            ref.step()
    for p, r in zip(params, ref_params):
        assert rel(p.detach(), r.detach()) < 1e-6, f"seed {seed}"
    assert float(opt.state[params[0]]["step"]) == 10


def test_megatron_on_npu_leaves_overflow_to_the_scaler(monkeypatch):
    install(monkeypatch)
    opt = build_optimizer("megatron_adamw", small_model().parameters(), lr=LR, grad_scaling=True)
    assert not supports_sync_free_amp(opt)  # npu_apply_adam_w cannot skip on the device
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.zeros(())
    with pytest.raises(RuntimeError, match="use torch_npu's GradScaler"):
        opt.step()


# --------------------------------------------------- the stand-in refuses what torch_npu refuses
def test_stand_in_rejects_wrong_npu_apply_adam_w_calls(monkeypatch):
    fake = install(monkeypatch)
    var, m, v, g = (torch.zeros(3) for _ in range(4))
    args = (1.0, 1.0, 1e-3, 1e-2, 0.9, 0.999)
    with pytest.raises(TypeError, match="eps"):  # the 7th argument is `epsilon`
        fake.npu_apply_adam_w(*args, eps=1e-8, grad=g, max_grad_norm=None, amsgrad=False, maximize=False,
                              out=(var, m, v))
    with pytest.raises(TypeError):  # out is keyword-only
        fake.npu_apply_adam_w(*args, 1e-8, g, None, False, False, (var, m, v))
    with pytest.raises(RuntimeError, match="shapes differ"):
        fake.npu_apply_adam_w(*args, 1e-8, torch.zeros(4), None, False, False, out=(var, m, v))
    with pytest.raises(RuntimeError, match="amsgrad is only supported as False"):
        fake.npu_apply_adam_w(*args, 1e-8, g, None, True, False, out=(var, m, v))
    with pytest.raises(RuntimeError, match="one dtype"):  # no silent cast of a gradient of another dtype
        fake.npu_apply_adam_w(*args, 1e-8, g.half(), None, False, False, out=(var, m, v))
    fake.npu_apply_adam_w(*args, epsilon=1e-8, grad=g, out=(var, m, v))  # the documented form passes


def test_stand_in_npu_fused_adamw_contract(monkeypatch):
    fake = install(monkeypatch)
    Fused = fake.optim.NpuFusedAdamW
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = Fused([a, b], lr=0.1)
    assert opt.defaults["weight_decay"] == 1e-2  # torch_npu's default, not torch's 0 or AdamW's
    a.grad = torch.ones(4)  # b has no gradient at the first step...
    opt.step()
    b.grad = torch.ones(4)  # ...so it is never combined, never updated
    before = (a.detach().clone(), b.detach().clone())
    opt.step()
    assert torch.equal(b.detach(), before[1])
    assert not torch.allclose(a.detach(), before[0])  # a moved, from its combined gradient
    a.grad = torch.ones(4)  # a replaced grad (what DeepSpeed ZeRO does) would be ignored: refused here
    with pytest.raises(RuntimeError, match="grad was replaced after the optimizer combined"):
        opt.step()
    with pytest.raises(ValueError, match="set_to_none is not supported"):
        opt.zero_grad(set_to_none=True)

    half = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    half.grad = torch.ones(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 or float16"):
        Fused([half]).step()
    strided = nn.Parameter(torch.ones(4, 4).t())
    strided.grad = torch.ones(4, 4).t()
    with pytest.raises(RuntimeError, match="contiguous"):
        Fused([strided]).step()
    install(monkeypatch, pretend_npu=False)
    cpu = nn.Parameter(torch.ones(4))
    cpu.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="must be on NPU"):
        Fused([cpu]).step()


# ------------------------------------------------------------- optimizers per engine (issue #19 item 3)
@pytest.mark.parametrize("engine,name,expected", [
    ("none", "fused_adamw", "NpuFusedAdamW"), ("ddp", "fused_adamw", "NpuFusedAdamW"),
    ("ddp", "megatron_adamw", "MegatronAdamW"), ("fsdp", "fused_adamw", "AdamW"),
    ("fsdp", "megatron_adamw", "AdamW"), ("fsdp", "adamw", "AdamW"), ("zero2", "fused_adamw", "AdamW"),
    ("zero3", "fused_adamw", "AdamW"), ("zero3", "megatron_adamw", "MegatronAdamW")])
def test_npu_optimizer_is_valid_for_its_engine(monkeypatch, engine, name, expected):
    install(monkeypatch)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = build_optimizer(name, small_model().parameters(), lr=LR, engine=engine)
    assert type(opt).__name__ == expected
    assert not opt.defaults.get("fused")  # torch's fused AdamW never meets torch_npu's GradScaler
    assert bool(caught) == (expected == "AdamW" and name != "adamw")
    with pytest.raises(ValueError, match="Unknown engine 'zero1'"):
        build_optimizer(name, small_model().parameters(), lr=LR, engine="zero1")


def test_npu_fused_adamw_under_zero_style_grad_replacement(monkeypatch):
    """ZeRO assigns new .grad tensors each step: NpuFusedAdamW (engine none) is refused by the stand-in;
    the optimizer built for engine zero2 steps the new gradients."""
    install(monkeypatch)
    for engine, fails in (("none", True), ("zero2", False)):
        model = small_model()
        opt = build_optimizer("fused_adamw", model.parameters(), lr=LR, engine=engine)
        for step in range(2):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.5)  # a NEW tensor each step, as ZeRO gives the optimizer
            if step == 1 and fails:
                with pytest.raises(RuntimeError, match="grad was replaced"):
                    opt.step()
            else:
                opt.step()


def _dtensor_params(model):
    """The model's parameters as 1-rank DTensors (FSDP2's parameters) on a CPU mesh."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="dnpu-store-"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    return [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in model.parameters()]


@pytest.fixture
def process_group():
    import torch.distributed as dist

    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_npu_fsdp_dtensor_parameters(monkeypatch, process_group):
    """FSDP2's DTensor parameters: NpuFusedAdamW is refused by the stand-in; engine='fsdp' gives torch's
    foreach AdamW, which steps them to the float64 AdamW result; the fused clip refuses local-shard norms."""
    fake = install(monkeypatch)
    params = _dtensor_params(small_model())
    for p in params:
        p.grad = torch.distributed.tensor.distribute_tensor(torch.full(p.shape, 0.5), p.device_mesh, p.placements)
    with pytest.raises(RuntimeError, match="DTensor parameters are not supported"):
        fake.optim.NpuFusedAdamW(params, lr=LR).step()
    with pytest.raises(RuntimeError, match="only this rank's shard"):
        clip_grad_norm(fake.optim.NpuFusedAdamW(params, lr=LR), params, 1.0)
    opt = build_optimizer("fused_adamw", params, lr=LR, weight_decay=WD, engine="fsdp")
    before = [p.detach().full_tensor().double() for p in params]
    opt.step()
    ref = [b.clone().requires_grad_(True) for b in before]
    for r in ref:
        r.grad = torch.full(r.shape, 0.5, dtype=torch.float64)
    torch.optim.AdamW(ref, lr=LR, weight_decay=WD, foreach=False).step()
    assert max(rel(p.detach().full_tensor(), r.detach()) for p, r in zip(params, ref)) < 1e-6


def test_prodigy_is_upstream_prodigyopt_with_its_options_and_refused_on_sharded_engines(monkeypatch):
    """--optimizer prodigy (upstream's DreamBooth READMEs): prodigyopt's Prodigy with the --prodigy_* options;
    one UsageError line under FSDP / DeepSpeed, whose shards cannot give its whole-parameter sums."""
    pytest.importorskip("prodigyopt", reason="installed by the test extra")
    from prodigyopt import Prodigy

    from diffusers_npu.errors import UsageError
    from diffusers_npu.train.engine import Engine

    p = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer("prodigy", [p], lr=1.0, weight_decay=0.0,
                          prodigy={"beta3": None, "decouple": True, "use_bias_correction": False, "safeguard_warmup": True})
    assert type(opt) is Prodigy and opt.defaults["safeguard_warmup"] is True and opt.defaults["beta3"] is None
    p.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4))  # it stepped
    args = type("A", (), {"optimizer": "prodigy", "distributed": "fsdp", "max_bad_steps": 0, "use_ema": False})()
    engine = Engine("fsdp", world_size=2)
    with pytest.raises(UsageError, match=r"^--optimizer prodigy is not available with --distributed fsdp: .*"
                                         r"use --distributed ddp \(or one process\)"):
        engine.check_args(args)
