"""The self-check's numeric checks: attention modes, optimizers, clipping and fp16 loss scaling, each run on
the device under test and compared with float64 on the CPU.

The references are computed on the CPU because Ascend's compute units have no float64 (and a reference
computed by the device under test would share its faults); the device's inputs and weights are the
reference's, rounded to the dtype under test, so the error measured is the kernel's alone.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Iterator, List, Optional

import torch
from torch import nn

from .. import device as dev
from ..attention import set_attention
from ..optim import _unwrap, build_optimizer, clip_grad_norm, supports_sync_free_amp, zero_grad
from .realsize import device_kind, fallback_for_attention
from .result import Result, attention_result

ATTENTION_MODES = ("auto", "flash", "upcast", "default")
OPTIMIZERS = ("adamw", "fused_adamw", "megatron_adamw")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Relative (Frobenius) error allowed per dtype; fp16/bf16 carry 11/8 significant bits.
ATTENTION_TOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 3e-2}
OPTIMIZER_TOL = 1e-5   # 20 fp32 AdamW steps against float64
CLIP_TOL = 1e-5
B, Q, K, HEADS, DIM_HEAD, QUERY_DIM, CROSS_DIM = 2, 16, 11, 4, 8, 32, 24


def _timed(name: str, body: Callable[[], Result]) -> Result:
    start = time.perf_counter()
    try:
        result = body()
    except Exception as exc:  # a check that crashes is a failed check, reported with its reason
        result = Result(name, "FAIL", note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    result.check = name
    result.seconds = time.perf_counter() - start
    return result


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to("cpu", torch.float64)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def dtype_unsupported(device: str, dtype_name: str) -> Optional[str]:
    """Why ``dtype`` cannot be checked on ``device`` (None = it can)."""
    if dtype_name == "bf16" and not dev.supports_bf16(device):
        return f"bf16 is not supported on this {dev.device_type(device)} device"
    dtype = DTYPES[dtype_name]
    try:
        a = torch.ones(4, 8, device=device, dtype=dtype)
        torch.matmul(a, a.T).softmax(-1).sum().cpu()
    except Exception as exc:
        return f"{dtype_name} matmul/softmax fails on {device}: {type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------------------------ attention
def _reference_attention(attn, hidden, context, mask) -> torch.Tensor:
    """Naive float64 attention written independently of diffusers_npu: softmax(q k^T * scale + mask) v."""
    ctx = hidden if context is None else context
    q, k, v = attn.to_q(hidden), attn.to_k(ctx), attn.to_v(ctx)
    h = attn.heads
    split = lambda t: t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) * attn.scale
    if mask is not None:
        m = mask[:, None]  # (B, 1, 1, K): broadcast over heads and queries
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(hidden.shape[0], -1, v.shape[-1])
    return attn.to_out[0](out)


def _attention_cases(gen):
    from diffusers.models.attention_processor import Attention

    for cross in (False, True):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
        attn = Attention(QUERY_DIM, cross_attention_dim=CROSS_DIM if cross else None, heads=HEADS,
                         dim_head=DIM_HEAD).eval()
        hidden = torch.randn(B, Q, QUERY_DIM, generator=gen, dtype=torch.float64)
        context = torch.randn(B, K, CROSS_DIM, generator=gen, dtype=torch.float64) if cross else None
        keep = torch.rand(B, K if cross else Q, generator=gen) > 0.4
        keep[:, 0] = True  # every query keeps a key
        for mask_kind in ("none", "additive", "bool"):
            mask = {"none": None, "bool": keep.unsqueeze(1),
                    "additive": ((~keep).double() * -10000.0).unsqueeze(1)}[mask_kind]
            yield f"{'cross' if cross else 'self'}/{mask_kind}", attn, hidden, context, mask


def _run_attention(device, dtype, mode, attn, hidden, context, mask):
    """(device output, float64 reference, processor path counts) for one case."""
    rounded = copy.deepcopy(attn).to(dtype)
    to_dev = lambda t: None if t is None else (t.to(device) if t.dtype == torch.bool else t.to(device, dtype))  # noqa: E731
    rnd64 = lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(dtype).double())  # noqa: E731
    with torch.no_grad():
        ref = _reference_attention(copy.deepcopy(rounded).double(), rnd64(hidden), rnd64(context), rnd64(mask))
        module = set_attention(rounded.to(device), mode)
        out = module(to_dev(hidden), encoder_hidden_states=to_dev(context), attention_mask=to_dev(mask))
    counts = dict(getattr(module.processor, "path_counts", {}) or {type(module.processor).__name__: 1})
    return out, ref, counts


def attention_checks(device: str, seed: int = 0) -> Iterator[Result]:
    for dtype_name, dtype in DTYPES.items():
        why_not = dtype_unsupported(device, dtype_name)
        for mode in ATTENTION_MODES:
            name = f"attention {mode} {dtype_name} (self+cross, masks)"
            if why_not:
                yield Result(name, "skip", note=why_not)
                continue

            def body(mode=mode, dtype=dtype, dtype_name=dtype_name):
                gen = torch.Generator().manual_seed(seed)
                errors, paths = [], {}
                for case, attn, hidden, context, mask in _attention_cases(gen):
                    out, ref, counts = _run_attention(device, dtype, mode, attn, hidden, context, mask)
                    errors.append((_rel(out, ref), case))
                    for path, n in counts.items():
                        paths[path] = paths.get(path, 0) + n
                result = attention_result(errors, paths, ATTENTION_TOL[dtype_name])
                if mode in ("flash", "auto") and dtype_name != "fp32":
                    result.fallback = fallback_for_attention(device_kind(device), paths)
                return result

            yield _timed(name, body)
    yield _timed("attention fp16 overflow (auto, upcast)", lambda: _overflow_attention(device))


def _overflow_attention(device: str) -> Result:
    """|q.k| * scale = 90000 > 65504 for every pair: the fp16 score matrix is all inf in the stock path."""
    why_not = dtype_unsupported(device, "fp16")
    if why_not:
        return Result("", "skip", note=why_not)
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed_of("overflow"))
    heads, dim_head = 2, 16
    dim = heads * dim_head
    attn = Attention(dim, heads=heads, dim_head=dim_head).eval()
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(dim))
        attn.to_k.weight.copy_(torch.eye(dim))
        attn.to_v.weight.mul_(0.1)
    hidden = torch.randn(B, Q, dim, dtype=torch.float64)
    hidden[..., 0] = hidden[..., dim_head] = 600.0
    errors = []
    for mode in ("auto", "upcast"):
        out, ref, _ = _run_attention(device, torch.float16, mode, attn, hidden, None, None)
        errors.append(_rel(out, ref) if torch.isfinite(out).all() else float("inf"))
    worst = max(errors)
    return Result("", "pass" if worst < 2e-2 else "FAIL", worst, 2e-2, note="non-finite = inf error")


def seed_of(text: str) -> int:
    return sum(map(ord, text))


# ----------------------------------------------------------------------------------- optimizers
def _small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def _set_grads(params: List[torch.Tensor], grads: List[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        g = g.to(p.device, p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)  # in place, as backward() does: NpuFusedAdamW steps from its combined buffer


def _implementation(opt) -> str:
    inner = _unwrap(opt)
    fused = getattr(inner, "defaults", {}).get("fused")
    return type(inner).__name__ + (" (fused kernel)" if fused else "")


def optimizer_checks(device: str, steps: int = 20, seed: int = 0) -> Iterator[Result]:
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for name in OPTIMIZERS:
        def body(name=name):
            model = _small_model(seed)
            ref_params = [p.detach().double().clone().requires_grad_(True) for p in model.parameters()]
            initial = [r.detach().clone() for r in ref_params]
            ref = torch.optim.AdamW(ref_params, foreach=False, **hp)
            params = list(model.to(device).parameters())
            opt = build_optimizer(name, params, **hp)
            gen = torch.Generator().manual_seed(seed + 1)
            for _ in range(steps):
                grads = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref_params]
                for r, g in zip(ref_params, grads):
                    r.grad = g.clone()
                _set_grads(params, grads)
                opt.step()
                ref.step()
            worst = max(_rel(p, r.detach()) for p, r in zip(params, ref_params))
            moved = min(float((r.detach() - i).norm() / i.norm()) for r, i in zip(ref_params, initial))
            ok = worst < OPTIMIZER_TOL and moved > 1e-2  # agreeing with a reference that moved means something
            return Result("", "pass" if ok else "FAIL", worst, OPTIMIZER_TOL, note=_implementation(opt),
                          fallback=_optimizer_fallback(device, name, opt))

        yield _timed(f"optimizer {name} {steps} steps vs float64 AdamW", body)


def _optimizer_fallback(device: str, name: str, opt) -> str:
    """What ran instead of torch_npu's optimizer kernels ("" = they ran, or ``name`` has none)."""
    kind = device_kind(device)
    if name == "fused_adamw" and type(_unwrap(opt)).__name__ != "NpuFusedAdamW":
        return f"{_implementation(opt)} on {kind}, not torch_npu's NpuFusedAdamW"
    if name == "megatron_adamw" and kind != "npu":
        return f"torch ops on {kind}, not npu_apply_adam_w"
    return ""


# ------------------------------------------------------------------------------------- clipping
def clip_checks(device: str, seed: int = 0) -> Iterator[Result]:
    for scaled in (False, True):
        def body(scaled=scaled):
            model = _small_model(seed)
            ref_params = [p.detach().double().clone() for p in model.parameters()]
            params = list(model.to(device).parameters())
            opt = build_optimizer("fused_adamw", params, lr=1e-3)
            gen = torch.Generator().manual_seed(seed + 2)
            grads = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref_params]
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            grads = [g * (5.0 / total) for g in grads]  # norm 5, clipped to 1
            for r, g in zip(ref_params, grads):
                r.grad = g.clone()
            ref_norm = float(torch.nn.utils.clip_grad_norm_(ref_params, 1.0))
            scaler = None
            if scaled:  # gradients arrive multiplied by the loss scale: the clip must unscale them first
                scaler = dev.make_grad_scaler(device_kind(device), init_scale=1024.0)
                loss = sum((p * g.to(device, p.dtype)).sum() for p, g in zip(params, grads))
                scaler.scale(loss).backward()
            else:
                _set_grads(params, grads)
            norm = clip_grad_norm(opt, params, 1.0, scaler=scaler)
            if not isinstance(norm, torch.Tensor):
                return Result("", "FAIL", note=f"clip_grad_norm returned {type(norm).__name__}, not a tensor")
            errs = [abs(float(norm) - ref_norm) / ref_norm]
            errs += [_rel(p.grad, r.grad) for p, r in zip(params, ref_params)]
            if scaler is not None:
                scaler.step(opt)  # must not unscale twice
                scaler.update()
            worst = max(errs)
            fused = callable(getattr(_unwrap(opt), "clip_grad_norm_fused_", None))
            note = ("fused clip_grad_norm_fused_" if fused else "torch clip_grad_norm_") + f" via {_implementation(opt)}"
            return Result("", "pass" if worst < CLIP_TOL else "FAIL", worst, CLIP_TOL, note=note,
                          fallback="" if fused else f"torch's clip on {device_kind(device)}, not the fused clip")

        yield _timed("clip fused_adamw" + (" under GradScaler (unscaled first)" if scaled else "")
                     + " vs clip_grad_norm_", body)


# ------------------------------------------------------------------------------ fp16 overflow step
def scaler_checks(device: str, seed: int = 0) -> Iterator[Result]:
    why_not = dtype_unsupported(device, "fp16")
    for name in OPTIMIZERS:
        label = f"fp16 overflow step through the GradScaler ({name})"
        if why_not:
            yield Result(label, "skip", note=why_not)
            continue

        def body(name=name):
            torch.manual_seed(seed)
            lin = nn.Linear(8, 4).to(device)
            opt = build_optimizer(name, lin.parameters(), lr=1e-2, grad_scaling=True)
            scaler = dev.make_grad_scaler(device_kind(device), init_scale=2.0**16)
            kind = dev.amp_device_type(device)

            def step(x):
                with torch.autocast(kind, dtype=torch.float16):
                    loss = lin(x).float().sum()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                zero_grad(opt)

            before = [p.detach().clone() for p in lin.parameters()]
            step(torch.full((2, 8), 1e5, device=device))  # 1e5 > 65504: inf in fp16, non-finite gradients
            skipped = all(torch.equal(p.detach(), b) for p, b in zip(lin.parameters(), before))
            halved = scaler.get_scale() == 2.0**15
            # One sample of 0.5: the fp16 weight gradient is 0.5 x scale = 16384, well inside fp16's range.
            step(torch.full((1, 8), 0.5, device=device))
            trained = not all(torch.equal(p.detach(), b) for p, b in zip(lin.parameters(), before))
            kept = scaler.get_scale() == 2.0**15
            problems = [t for t, ok in (("step not skipped", skipped), ("scale not halved", halved),
                                        ("finite step did not train", trained), ("scale changed", kept)) if not ok]
            sync = "on the device" if supports_sync_free_amp(opt) else "on the host (.item())"
            note = "; ".join(problems) or f"skipped, scale 65536 -> 32768; overflow decided {sync}"
            npu_scaler = type(scaler).__module__.startswith("torch_npu")
            return Result("", "FAIL" if problems else "pass", note=f"{note}; {type(scaler).__module__}",
                          fallback="" if npu_scaler else f"torch's GradScaler on {device_kind(device)}, not torch_npu's")

        yield _timed(label, body)


# ----------------------------------------------------------------------------- fp32 is fp32
FP32_TOL = 1e-5  # fp32 matmuls of 256 terms land near 1e-7; fp16 compute (11 bits) near 5e-4


def fp32_check(device: str, seed: int = 0) -> Result:
    """fp32 matmul and linear on the device against float64: fails where the device computes "fp32" in fp16
    (torch_npu's allow_fp32_to_fp16 default below Ascend910B1, unless the device settings keep fp32)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(256, 256, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(256, generator=gen, dtype=torch.float64)
    f = lambda t: t.float().to(device)  # noqa: E731
    mm = torch.matmul(f(a), f(b))
    lin = torch.nn.functional.linear(f(a), f(b), f(bias))
    rnd = lambda t: t.float().double()  # noqa: E731
    worst = max(_rel(mm, rnd(a) @ rnd(b)), _rel(lin, rnd(a) @ rnd(b).T + rnd(bias)))
    note = "matmul, linear" + ("" if worst < FP32_TOL else ": the device computes fp32 in lower precision")
    return Result("", "pass" if worst < FP32_TOL else "FAIL", worst, FP32_TOL, note=note)


def fused_resume_check(device: str, seed: int = 0, steps: int = 3) -> Result:
    """fused_adamw (NpuFusedAdamW on NPU) saved after ``steps`` steps and resumed into a new model and optimizer
    continues exactly like the run that was not interrupted."""
    import io

    gen = torch.Generator().manual_seed(seed + 3)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in _small_model(seed).parameters()]
             for _ in range(2 * steps)]

    def run(model, opt, chunk):
        params = list(model.parameters())
        for g in chunk:
            _set_grads(params, g)
            opt.step()

    model = _small_model(seed).to(device)
    opt = build_optimizer("fused_adamw", list(model.parameters()), lr=1e-2)
    run(model, opt, grads[:steps])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    run(model, opt, grads[steps:])
    buffer.seek(0)
    saved = torch.load(buffer, map_location=device, weights_only=True)
    resumed = _small_model(seed + 1).to(device)
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer("fused_adamw", list(resumed.parameters()), lr=1e-2)
    opt2.load_state_dict(saved["optimizer"])
    run(resumed, opt2, grads[steps:])
    worst = max(_rel(p, q.detach().to("cpu", torch.float64)) for p, q in zip(resumed.parameters(), model.parameters()))
    tol = 1e-6
    return Result("", "pass" if worst < tol else "FAIL", worst, tol, note=f"{_implementation(opt2)}, {steps}+{steps} steps",
                  fallback=_optimizer_fallback(device, "fused_adamw", opt2))


def numeric_checks(device: str, seed: int = 0) -> Iterator[Result]:
    yield _timed("fp32 matmul/linear stay fp32 (vs float64)", lambda: fp32_check(device, seed))
    yield from attention_checks(device, seed)
    yield from optimizer_checks(device, seed=seed)
    yield _timed("optimizer fused_adamw resumed from a checkpoint vs uninterrupted", lambda: fused_resume_check(device, seed))
    yield from clip_checks(device, seed)
    yield from scaler_checks(device, seed)


__all__ = ["attention_checks", "clip_checks", "dtype_unsupported", "fp32_check", "fused_resume_check",
           "numeric_checks", "optimizer_checks", "scaler_checks"]
