"""The self-check at the sizes Stable Diffusion really trains at: attention forward and backward against float64
at SD 1.5 / 2.1 / SDXL shapes, whether a capable device really ran its fused attention kernel, and a real-sized
UNet training step (throughput and peak memory).

On an accelerator the shapes are the real ones; on the CPU the same code runs at reduced sizes (sequence
lengths capped, two heads), so CI proves the harness and the code path, and an NPU run proves the numbers.
The float64 references run on the CPU, chunked over queries and for two heads only (enough to catch a wrong
kernel, small enough for a 9,216-token self-attention).
"""
from __future__ import annotations

import math
import time
import types
from typing import Iterator, List, Optional, Tuple

import torch

from .. import device as dev
from .result import Result, attention_result

# (label, heads, query length, head dim): the attention layers SD trains. SD 1.5 (512 px): 8 heads, head dims
# 40..160 at 64x64..16x16 latents; SD 2.1 (768 px): head dim 64, 96x96 = 9,216 tokens; SDXL (1024 px): head dim
# 64 with 10 and 20 heads at 64x64 and 32x32. Each runs as self-attention, and as cross-attention on 77 text
# tokens with and without a padding mask.
SD_SHAPES: List[Tuple[str, int, int, int]] = [
    ("SD1.5 64x64", 8, 4096, 40), ("SD1.5 16x16", 8, 256, 160), ("SD2.1-768 96x96", 5, 9216, 64),
    ("SDXL 64x64", 10, 4096, 64), ("SDXL 32x32", 20, 1024, 64)]
TEXT_TOKENS = 77
CPU_MAX_SEQ, CPU_HEADS = 256, 2
TOL = {torch.float16: 2e-2, torch.bfloat16: 3e-2}
_REF_HEADS = 2          # heads compared against float64 (the first and the last)
_REF_CHUNK = 1024       # queries per float64 block


def device_kind(device: str) -> str:
    """The device type the project's code sees for tensors on ``device`` (the stand-in's seam included)."""
    return dev.tensor_device_type(torch.empty(0, device=device))


def on_cpu(device: str) -> bool:
    """Tensors really in host memory (also under the test stand-in, whose "NPU" tensors are CPU tensors):
    the real-size rows then run at reduced sizes."""
    return torch.device(device).type == "cpu"


def _timed(name: str, body) -> Result:
    start = time.perf_counter()
    try:
        result = body()
    except Exception as exc:  # a crash is a failed check with its reason
        result = Result(name, "FAIL", note=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    result.check, result.seconds = name, time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------ float64 reference
def _reference(q, k, v, keep, grad_out, scale):
    """softmax(q k^T * scale) v and its gradients for (B, h, S, D) float64 tensors, chunked over queries.
    ``keep``: (B, K) bool or None."""
    out, dq = torch.empty_like(q), torch.empty_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    bias = None if keep is None else torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))[:, None, None]
    for start in range(0, q.shape[2], _REF_CHUNK):
        sl = slice(start, start + _REF_CHUNK)
        scores = q[:, :, sl] @ k.transpose(-1, -2) * scale
        if bias is not None:
            scores = scores + bias
        p = scores.softmax(-1)
        out[:, :, sl] = p @ v
        g = grad_out[:, :, sl]
        dv += p.transpose(-1, -2) @ g
        dp = g @ v.transpose(-1, -2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[:, :, sl] = ds @ k * scale
        dk += ds.transpose(-1, -2) @ q[:, :, sl] * scale
    return out, dq, dk, dv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _attention_case(device, dtype, heads, q_len, k_len, dim, masked, gen) -> Tuple[float, dict]:
    """(worst relative error of out/dq/dk/dv, processor path counts) for one shape through ``auto``."""
    from ..attention import AutoAttnProcessor

    batch = 2 if masked else 1
    shape_q, shape_k = (batch, heads, q_len, dim), (batch, heads, k_len, dim)
    q64, k64, v64 = (torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).double()
                     for s in (shape_q, shape_k, shape_k))
    g64 = torch.randn(shape_q, generator=gen, dtype=torch.float64).to(dtype).double()
    keep = None
    if masked:  # text padding: sample 0 keeps 20 tokens, sample 1 all 77
        keep = torch.ones(batch, k_len, dtype=torch.bool)
        keep[0, 20:] = False
    q, k, v = (t.to(device, dtype).requires_grad_(True) for t in (q64, k64, v64))
    proc = AutoAttnProcessor()
    attn = types.SimpleNamespace(heads=heads, scale=dim ** -0.5)
    mask = None if keep is None else keep.to(device)[:, None, None, :]  # the processors' prepared (B,1,1,K)
    out = proc._attend(attn, q, k, v, mask)
    out.backward(g64.to(device, dtype))
    picked = [0, heads - 1][:_REF_HEADS]
    sel = lambda t: t[:, picked].contiguous()  # noqa: E731
    ref = _reference(sel(q64), sel(k64), sel(v64), keep, sel(g64), attn.scale)
    got = (out, q.grad, k.grad, v.grad)
    worst = max(_rel(sel(t.detach().cpu()), r) for t, r in zip(got, ref))
    return worst, dict(proc.path_counts)


def attention_realsize_checks(device: str, seed: int = 0) -> Iterator[Result]:
    """One row per dtype: every SD shape, self and cross (77 tokens, with and without mask), forward and
    backward through ``auto`` against float64."""
    from .numerics import dtype_unsupported

    kind = device_kind(device)
    reduced = on_cpu(device)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        label = f"attention auto fwd+bwd at SD shapes {name}" + (" (reduced sizes on CPU)" if reduced else "")
        why_not = dtype_unsupported(device, name)
        if why_not:
            yield Result(label, "skip", note=why_not)
            continue

        def body(dtype=dtype):
            gen = torch.Generator().manual_seed(seed)
            errors, paths = [], {}
            for shape, heads, seq, dim in SD_SHAPES:
                if reduced:
                    heads, seq = CPU_HEADS, min(seq, CPU_MAX_SEQ)
                for k_len, masked, what in ((seq, False, "self"), (TEXT_TOKENS, False, "cross"),
                                            (TEXT_TOKENS, True, "cross+mask")):
                    err, counts = _attention_case(device, dtype, heads, seq, k_len, dim, masked, gen)
                    errors.append((err, f"{shape} D={dim} S={seq} {what}"))
                    for path, n in counts.items():
                        paths[path] = paths.get(path, 0) + n
            result = attention_result(errors, paths, TOL[dtype])
            result.fallback = fallback_for_attention(kind, paths)
            return result

        yield _timed(label, body)


def fallback_for_attention(kind: str, paths: dict) -> str:
    """Why attention rows did not exercise the NPU path ("" when they did)."""
    if kind != "npu":
        return f"ran on {kind}: SDPA / fp32 scores, not torch_npu's kernels"
    fused = {"sdpa_npu_fused", "npu_fusion_attention"}
    capable = dev.npu_sdpa_is_fused() or dev.npu_supports_fusion_attention()
    if capable and not fused & set(paths):
        return "no fused NPU path ran on a SoC that has one"
    return ""


# ----------------------------------------------------------------------------- fused kernel used?
def fused_kernel_check(device: str, seed: int = 0) -> Result:
    """FAIL when a device with fused fp16 attention did not use it at SD 1.5's largest layer (8 heads, 4,096
    tokens, head dim 40): either the processor took an unfused path, or the kernel behind the call kept a
    score matrix (peak memory above half of B*H*S*S fp16 bytes = 268 MB; a fused kernel needs a few MB)."""
    from ..attention import AutoAttnProcessor

    kind = device_kind(device)
    if kind == "cpu":
        return Result("", "skip", note="no NPU or GPU here: there is no fused kernel to check",
                      fallback="ran on cpu")
    if kind == "npu" and not (dev.npu_sdpa_is_fused() or dev.npu_supports_fusion_attention()):
        return Result("", "skip", note=f"{dev.npu_soc_name()}: no fused fp16 attention on this SoC "
                                       f"(fp32 scores are the intended path)")
    heads, seq, dim = (CPU_HEADS, CPU_MAX_SEQ, 40) if on_cpu(device) else (8, 4096, 40)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=gen).to(device, torch.float16) for _ in range(3))
    proc = AutoAttnProcessor()
    attn = types.SimpleNamespace(heads=heads, scale=dim ** -0.5)
    dev.synchronize(kind)
    dev.reset_peak_memory(kind)
    base = dev.peak_memory_bytes(kind)  # q, k, v and whatever else is allocated now
    with torch.no_grad():
        proc._attend(attn, q, k, v, None)
    dev.synchronize(kind)
    grew = dev.peak_memory_bytes(kind) - base
    scores = heads * seq * seq * 2
    paths = dict(proc.path_counts)
    unfused = set(paths) - {"sdpa_npu_fused", "npu_fusion_attention", "sdpa_fused_cuda"}
    problems = []
    if unfused:
        problems.append(f"took {', '.join(sorted(unfused))}")
    if grew > scores / 2:
        problems.append(f"peak memory grew {grew / 2**20:.0f} MiB (a score matrix is {scores / 2**20:.0f} MiB): "
                        f"the kernel behind the call was not fused")
    note = "; ".join(problems) or f"{', '.join(paths)}; peak +{grew / 2**20:.1f} MiB (< {scores / 2**21:.0f})"
    return Result("", "FAIL" if problems else "pass", note=note)


# --------------------------------------------------------------------------------- UNet step
def unet_step_check(device: str, seed: int = 0) -> Result:
    """Throughput and peak memory of real training steps: SD 1.5's UNet at 512 px (64x64 latents), batch 1,
    the device's default precision and optimizer; on the CPU the tiny preset (16x16 latents, batch 2)."""
    from diffusers import UNet2DConditionModel

    from .. import presets
    from ..attention import set_attention
    from ..optim import build_optimizer

    kind = device_kind(device)
    real = not on_cpu(device)
    preset = presets.get_preset("sd15" if real else "tiny")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**preset.unet).to(device)
    set_attention(unet, "auto")
    batch, side = (1, 64) if real else (2, 16)
    accel = kind != "cpu"  # the device's defaults (trainer's): bf16 (else fp16 + loss scaler), fused AdamW
    amp = (torch.bfloat16 if dev.supports_bf16(kind) else torch.float16) if accel else None
    opt = build_optimizer("fused_adamw" if accel else "adamw", [p for p in unet.parameters()], lr=1e-5)
    scaler = dev.make_grad_scaler(kind) if amp == torch.float16 else None
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, side, side, generator=gen).to(device)
    text = torch.randn(batch, TEXT_TOKENS if real else 16, preset.unet["cross_attention_dim"], generator=gen).to(device)
    steps_t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    first = next(unet.parameters()).detach().clone()
    losses = []

    def step():
        with torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.mse_loss(unet(latents, steps_t, text).sample.float(), latents.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.detach())

    step()  # warm-up: kernels compiled / selected
    dev.synchronize(kind)
    dev.reset_peak_memory(kind)
    timed = 5 if real else 3
    start = time.perf_counter()
    for _ in range(timed):
        step()
    dev.synchronize(kind)
    seconds = time.perf_counter() - start
    peak = dev.peak_memory_bytes(kind)
    values = [float(x) for x in losses]
    moved = not torch.equal(first, next(unet.parameters()).detach())
    ok = all(math.isfinite(x) for x in values) and moved
    what = f"{preset.name} UNet, {side}x{side} latents, batch {batch}, {amp or torch.float32}".replace("torch.", "")
    note = (f"{what}: {batch * timed / seconds:.2f} images/s, peak memory {peak / 2**30:.2f} GiB"
            f"{' (process RSS)' if kind == 'cpu' else ''}, {type(opt).__name__}")
    if not ok:
        note = ("non-finite loss; " if moved else "weights did not change; ") + note
    return Result("", "pass" if ok else "FAIL", note=note)


def realsize_checks(device: str, seed: int = 0) -> Iterator[Result]:
    yield from attention_realsize_checks(device, seed)
    yield _timed("attention: the fused kernel ran (fp16, SD1.5 64x64 layer)", lambda: fused_kernel_check(device, seed))
    reduced = " (tiny preset on CPU)" if on_cpu(device) else ""
    yield _timed(f"UNet training step: throughput and peak memory{reduced}", lambda: unet_step_check(device, seed))


__all__ = ["SD_SHAPES", "attention_realsize_checks", "device_kind", "fused_kernel_check", "realsize_checks",
           "unet_step_check"]
