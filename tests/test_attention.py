"""Attention processors vs. a float64 reference, fp16 overflow, and the NPU kernel contract (fake).

Inputs are fresh random values on every run; each test prints its seed (shown by pytest on failure) and
``DIFFUSERS_NPU_TEST_SEED=<seed>`` replays it.
"""
from __future__ import annotations

import copy
import os
import secrets

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import logging

from diffusers_npu import attention as A
from diffusers_npu.attention import attention_mode_summary, count_attention_modules, set_attention
from fake_torch_npu import SOC_910_9391, SOC_910A, SOC_950, install

MODES = ("default", "flash", "upcast", "auto")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
B, Q, K, HEADS, DIM_HEAD = 2, 16, 11, 4, 8
QUERY_DIM, CROSS_DIM = 32, 24


@pytest.fixture
def seed():
    s = int(os.environ.get("DIFFUSERS_NPU_TEST_SEED") or secrets.randbelow(2**31))
    print(f"DIFFUSERS_NPU_TEST_SEED={s}")
    torch.manual_seed(s)
    return s


# ------------------------------------------------------------------------------ float64 reference
class Float64Reference:
    """Naive attention, written independently of diffusers_npu: softmax(q k^T * scale + mask) v."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            if encoder_hidden_states is None:
                context = hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*H, S, D)
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        scores = torch.bmm(q, k.transpose(1, 2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[1], hidden_states.shape[0])
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        out = attn.batch_to_head_dim(torch.bmm(scores.softmax(-1), v))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def reference(module, hidden, context=None, mask=None, **kwargs):
    ref = copy.deepcopy(module).double()
    ref.set_processor(Float64Reference())
    d = lambda t: None if t is None else (t if t.dtype == torch.bool else t.double())  # noqa: E731
    with torch.no_grad():
        return ref(d(hidden), encoder_hidden_states=d(context), attention_mask=d(mask), **kwargs)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------- inputs
def make_attention(cross: bool, dtype, **kwargs):
    attn = Attention(
        QUERY_DIM, cross_attention_dim=CROSS_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD, **kwargs
    )
    return attn.eval().to(dtype)


def make_inputs(cross: bool, mask_kind: str, dtype):
    hidden = torch.randn(B, Q, QUERY_DIM).to(dtype)
    context = torch.randn(B, K, CROSS_DIM).to(dtype) if cross else None
    key_len = K if cross else Q
    keep = torch.rand(B, key_len) > 0.4
    keep[:, 0] = True  # every query keeps at least one key
    if mask_kind == "none":
        mask = None
    elif mask_kind == "additive":  # how UNet2DConditionModel turns encoder_attention_mask into a bias
        mask = ((1 - keep.to(dtype)) * -10000.0).unsqueeze(1)
    elif mask_kind == "bool":  # SDPA-style keep mask
        mask = keep.unsqueeze(1)
    else:
        raise AssertionError(mask_kind)
    return hidden, context, mask, keep


# ------------------------------------------------------------------------ all modes vs reference
@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_float64_reference(mode, dtype, cross, mask_kind, seed):
    attn = make_attention(cross, dtype)
    hidden, context, mask, _ = make_inputs(cross, mask_kind, dtype)
    ref = reference(attn, hidden, context, mask)
    set_attention(attn, mode)
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    assert out.dtype == dtype and out.shape == (B, Q, QUERY_DIM)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{mode}/{dtype}/{mask_kind}: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_spatial_4d_groupnorm_residual_rescale(mode, dtype, seed):
    """VAE-style block: 4-D input, group norm, residual connection, output rescale, biases."""
    c = 32
    attn = Attention(
        c, heads=2, dim_head=16, norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0,
        bias=True, upcast_softmax=True,
    ).eval().to(dtype)
    hidden = torch.randn(B, c, 4, 5).to(dtype)
    ref = reference(attn, hidden)
    set_attention(attn, mode)
    with torch.no_grad():
        out = attn(hidden)
    assert out.shape == hidden.shape
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"


def test_scale_comes_from_the_module(seed):
    """scale_qk=False means scale 1.0; our processors must use attn.scale, not 1/sqrt(head_dim)."""
    attn = Attention(QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD, scale_qk=False).eval()
    assert attn.scale == 1.0
    hidden = torch.randn(B, Q, QUERY_DIM) * 0.3
    ref = reference(attn, hidden)
    for mode in ("flash", "upcast", "auto", "default"):
        set_attention(attn, mode)
        with torch.no_grad():
            assert rel_err(attn(hidden), ref) < 1e-5, f"{mode} (seed {seed})"
    assert attention_mode_summary(attn) == {"AttnProcessor": 1}  # diffusers' own choice for scale_qk=False


# --------------------------------------------------------------------------------- fp16 overflow
def overflow_case(dtype=torch.float16):
    """Identity q/k projections and a shared component of 600 in each head's first channel:
    q.k >= 600^2 = 360000, times scale 1/4 = 90000 > 65504 (fp16 max), for every query/key pair. The
    shared part is constant along each softmax row, so the true attention weights are set by the small
    random remainder and are far from one-hot."""
    heads, dim_head = 2, 16
    dim = heads * dim_head
    attn = Attention(dim, heads=heads, dim_head=dim_head).eval()
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(dim))
        attn.to_k.weight.copy_(torch.eye(dim))
        attn.to_v.weight.mul_(0.1)
    hidden = torch.randn(B, Q, dim)
    hidden[..., 0] = 600.0
    hidden[..., dim_head] = 600.0
    return attn.to(dtype), hidden.to(dtype)


def test_fp16_overflow_breaks_stock_but_not_upcast_or_auto(seed):
    attn, hidden = overflow_case()
    ref = reference(attn, hidden)
    assert torch.isfinite(ref).all()
    # The premise: fp16 scores really overflow.
    q = attn.to_q(hidden)[..., :16]
    assert torch.isinf(torch.bmm(q, q.transpose(1, 2)) * attn.scale).all()

    attn.set_processor(AttnProcessor())  # diffusers' classic bmm processor (attn.get_attention_scores)
    with torch.no_grad():
        stock = attn(hidden)
    assert not torch.isfinite(stock).all(), "expected the stock fp16 path to overflow"

    for mode in ("upcast", "auto"):
        set_attention(attn, mode)
        with torch.no_grad():
            out = attn(hidden)
        assert torch.isfinite(out).all(), mode
        err = rel_err(out, ref)
        assert err < 2e-2, f"{mode}: relative error {err:.2e} (seed {seed})"
    assert attn.processor.path_counts["upcast_fp32"] == 1  # auto chose the upcast path on CPU fp16


def test_upcast_survives_autocast_and_chunking(monkeypatch, seed):
    """Autocast must not push the upcast region back to fp16; query chunking must not change results."""
    attn, hidden = overflow_case()
    ref = reference(attn, hidden)
    monkeypatch.setattr(A, "_UPCAST_MAX_SCORE_BYTES", B * 2 * Q * 4 * 3)  # 3 queries per chunk
    set_attention(attn, "upcast")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = attn(hidden)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2, f"seed {seed}"


# --------------------------------------------------------------------------- whole models / API
def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def test_unet_modes_agree_and_summary(seed):
    unet = tiny_unet()
    sample, t = torch.randn(B, 4, 8, 8), torch.tensor([10, 500])
    context = torch.randn(B, 7, 24)
    enc_mask = torch.ones(B, 7)
    enc_mask[1, 4:] = 0  # padded text tokens in the second sample
    n_attn = sum(isinstance(m, Attention) for m in unet.modules())
    assert n_attn == 8  # self + cross in: 1 down layer, 1 mid layer, 2 up layers
    outs = {}
    for mode, cls in (("default", "AttnProcessor2_0"), ("flash", "FlashAttnProcessor"),
                      ("upcast", "UpcastAttnProcessor"), ("auto", "AutoAttnProcessor")):
        assert set_attention(unet, mode) is unet
        assert attention_mode_summary(unet) == {cls: n_attn}
        with torch.no_grad():
            outs[mode] = unet(sample, t, context, encoder_attention_mask=enc_mask).sample
    for mode in ("flash", "upcast", "auto"):
        assert rel_err(outs[mode], outs["default"].double()) < 1e-5, f"{mode} (seed {seed})"


def test_controlnet_is_covered():
    from diffusers import ControlNetModel

    cn = ControlNetModel(
        in_channels=4, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8, norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16),
    )
    set_attention(cn, "flash")
    summary = attention_mode_summary(cn)
    assert summary == {"FlashAttnProcessor": sum(summary.values())} and sum(summary.values()) >= 2


def test_unknown_mode_and_skipped_modules():
    attn = make_attention(False, torch.float32)
    with pytest.raises(ValueError, match=r"'fastest'.*auto, flash, upcast, default"):
        set_attention(attn, "fastest")
    assert set_attention(attn, "FLASH").processor.__class__.__name__ == "FlashAttnProcessor"
    # Added-KV attention needs processors we do not implement: it must keep its own.
    added = Attention(QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD, added_kv_proj_dim=16)
    before = type(added.processor)
    set_attention(added, "auto")
    assert type(added.processor) is before


def test_default_mode_is_diffusers_stock_processor():
    attn = make_attention(True, torch.float32)
    set_attention(attn, "auto")
    set_attention(attn, "default")
    assert type(attn.processor) is AttnProcessor2_0


# -------------------------------------------------------------------- NPU paths (recording fake)
def expected_npu_mask(keep, query_len):
    """Kernel polarity: True where the key is masked OUT; B1SS (one mask for all heads, no BNSS copy)."""
    return (~keep)[:, None, None, :].expand(B, 1, query_len, keep.shape[1])


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["flash", "auto"])
def test_npu_fusion_attention_contract(mode, dtype, cross, mask_kind, monkeypatch, seed):
    fake = install(monkeypatch)
    attn = make_attention(cross, dtype)
    hidden, context, mask, keep = make_inputs(cross, mask_kind, dtype)
    ref = reference(attn, hidden, context, mask)
    set_attention(attn, mode)
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context, attention_mask=mask)

    calls = fake.calls_named("npu_fusion_attention")
    assert len(calls) == 1
    call = calls[0]
    # flash: the project's explicit call; auto on this torch_npu (26.1.0, 910B2): torch_npu's own SDPA
    assert call["via"] == ("explicit" if mode == "flash" else "sdpa")
    assert call["inner_precise"] == (0 if mask is None else 2)  # as torch_npu's SDPA sets it
    key_len = K if cross else Q
    assert call["input_layout"] == "BNSD"
    assert call["head_num"] == HEADS
    assert call["scale"] == attn.scale == DIM_HEAD**-0.5
    assert call["keep_prob"] == 1.0
    assert call["q_shape"] == (B, HEADS, Q, DIM_HEAD)
    assert call["k_shape"] == call["v_shape"] == (B, HEADS, key_len, DIM_HEAD)
    assert call["dtypes"] == (dtype, dtype, dtype)
    if mask is None:
        assert call["mask"] is None
    else:
        assert call["mask_dtype"] == torch.bool
        assert torch.equal(call["mask"], expected_npu_mask(keep, Q)), "mask polarity/shape wrong"
    # The fake computes the true attention, so the end-to-end output must match the reference.
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"


@pytest.mark.parametrize("mode", ["flash", "auto"])
def test_npu_fp32_never_reaches_kernel(mode, monkeypatch, seed):
    fake = install(monkeypatch)
    attn = make_attention(True, torch.float32)
    hidden, context, mask, _ = make_inputs(True, "additive", torch.float32)
    ref = reference(attn, hidden, context, mask)
    set_attention(attn, mode)
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    explicit = lambda: [c for c in fake.calls_named("npu_fusion_attention") if c["via"] == "explicit"]  # noqa: E731
    assert explicit() == []
    # fp32 goes to torch_npu's SDPA, which fuses it on this SoC (with the mask as a bool)
    assert [(c["fused"], c["mask_dtype"]) for c in fake.calls_named("sdpa")] == [(True, torch.bool)]
    assert rel_err(out, ref) < 1e-5, f"seed {seed}"
    # ...but fp16 on the same module does reach the explicit kernel with flash (so the check above can fail).
    attn.half()
    set_attention(attn, "flash")
    with torch.no_grad():
        attn(hidden.half(), encoder_hidden_states=context.half(), attention_mask=mask.half())
    assert [c["dtypes"][0] for c in explicit()] == [torch.float16]


def test_npu_soft_bias_mask_uses_fp32_path(monkeypatch, seed):
    """A soft additive bias cannot become a bool mask: it must not be silently dropped."""
    fake = install(monkeypatch)
    attn = make_attention(True, torch.float16)
    hidden, context, _, _ = make_inputs(True, "none", torch.float16)
    bias = (torch.randn(B, 1, K) * 2).half()
    ref = reference(attn, hidden, context, bias)
    set_attention(attn, "flash")
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context, attention_mask=bias)
    assert fake.calls_named("npu_fusion_attention") == []
    assert attn.processor.path_counts == {"upcast_fp32": 1}
    assert rel_err(out, ref) < 2e-2, f"seed {seed}"


def test_npu_fp16_overflow_case_via_kernel(monkeypatch, seed):
    fake = install(monkeypatch)
    attn, hidden = overflow_case()
    ref = reference(attn, hidden)
    set_attention(attn, "auto")
    with torch.no_grad():
        out = attn(hidden)
    assert len(fake.calls_named("npu_fusion_attention")) == 1
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2, f"seed {seed}"


def test_npu_bool_mask_translation():
    additive = torch.tensor([[0.0, -10000.0, float("-inf"), torch.finfo(torch.float32).min]]).view(1, 1, 1, 4)
    assert A.npu_bool_mask(additive, 2).tolist() == [[[[False, True, True, True]] * 2]]
    keep = torch.tensor([True, False, True]).view(1, 1, 1, 3)
    assert A.npu_bool_mask(keep, 1).tolist() == [[[[False, True, False]]]]
    with pytest.raises(ValueError, match="soft bias"):
        A.npu_bool_mask(torch.tensor([0.0, -3.0]).view(1, 1, 1, 2), 1)
    assert A.npu_bool_mask(None, 5) is None


# ------------------------------------------------------------------------ real CUDA (GPU boxes)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["flash", "auto"])
def test_cuda_fused_path(mode, dtype, mask_kind, seed):
    attn = make_attention(True, dtype).cuda()
    hidden, context, mask, _ = make_inputs(True, mask_kind, dtype)
    ref = reference(attn.cpu(), hidden, context, mask)
    attn.cuda()
    set_attention(attn, mode)
    cu = lambda t: None if t is None else t.cuda()  # noqa: E731
    with torch.no_grad():
        out = attn(cu(hidden), encoder_hidden_states=cu(context), attention_mask=cu(mask))
    # fp32 on GPU: the fused kernels may use TF32-free fp32 maths, allow a little more than on CPU.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out.cpu(), ref) < tol, f"seed {seed}"
    assert attn.processor.path_counts.get("sdpa_fused_cuda", 0) == 1, dict(attn.processor.path_counts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_overflow_auto(seed):
    attn, hidden = overflow_case()
    ref = reference(attn, hidden)
    attn.cuda()
    set_attention(attn, "auto")
    with torch.no_grad():
        out = attn(hidden.cuda()).cpu()
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2, f"seed {seed}"


def test_npu_kernel_gets_module_scale(monkeypatch, seed):
    """With scale_qk=False the kernel must get scale=1.0 (upstream diffusers hard-codes 1/sqrt(d))."""
    fake = install(monkeypatch)
    attn = Attention(QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD, scale_qk=False).eval().half()
    hidden = (torch.randn(B, Q, QUERY_DIM) * 0.3).half()
    ref = reference(attn, hidden)
    set_attention(attn, "flash")
    with torch.no_grad():
        out = attn(hidden)
    assert [c["scale"] for c in fake.calls_named("npu_fusion_attention")] == [1.0]
    assert rel_err(out, ref) < 2e-2, f"seed {seed}"


# ------------------------------------------------------------------------- SoC gate and logging
# (SoC, torch_npu version) -> the path each mode takes for fp16 without / with a mask: "sdpa" = torch_npu's
# SDPA, fused there; "explicit" = the project's npu_fusion_attention call; "upcast" = fp32 scores.
@pytest.mark.parametrize("soc,version,flash,auto", [
    (221, "2.7.1.post8", ("explicit", "explicit"), ("sdpa", "sdpa")),        # 26.1.0: SDPA as good as explicit
    (221, "2.5.1", ("explicit", "explicit"), ("sdpa", "explicit")),          # SDPA masks with inner_precise=0
    (221, "2.1.0.post4", ("explicit", "explicit"), ("explicit", "explicit")),  # SDPA not fused yet
    (SOC_910_9391, "2.12.0", ("explicit", "explicit"), ("sdpa", "sdpa")),
    (SOC_950, "2.9.0.post2", ("explicit", "explicit"), ("sdpa", "explicit")),  # 26.0.0 knows the 950
    (SOC_950, "2.8.0.post2", ("upcast", "upcast"), ("upcast", "upcast")),    # 7.3.0 does not
    (SOC_910A, "2.7.1.post8", ("upcast", "upcast"), ("upcast", "upcast"))])  # no fused fp16 attention
@pytest.mark.parametrize("mode", ["flash", "auto"])
def test_npu_paths_by_soc_and_torch_npu(mode, soc, version, flash, auto, monkeypatch, caplog, seed):
    fake = install(monkeypatch, soc_version=soc, version=version)
    attn = make_attention(True, torch.float16)
    with caplog.at_level(logging.INFO, logger="diffusers_npu.attention"):
        set_attention(attn, mode)
    expected = dict(zip(("none", "additive"), flash if mode == "flash" else auto))
    for mask_kind in ("none", "additive"):
        fake.calls.clear()
        hidden, context, mask, _ = make_inputs(True, mask_kind, torch.float16)
        ref = reference(attn, hidden, context, mask)
        with torch.no_grad():
            out = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        assert rel_err(out, ref) < TOL[torch.float16], f"seed {seed}"
        kernel = [c["via"] for c in fake.calls_named("npu_fusion_attention")]
        want = {"sdpa": ["sdpa"], "explicit": ["explicit"], "upcast": []}[expected[mask_kind]]
        assert kernel == want, (mask_kind, kernel)
        if expected[mask_kind] == "sdpa":
            assert [c["fused"] for c in fake.calls_named("sdpa")] == [True]  # torch_npu fused it
    lines = [r.getMessage() for r in caplog.records if "set_attention(" in r.getMessage()]
    assert len(lines) == 1 and f"torch_npu {version}" in lines[0]


def test_fp32_on_a_910a_is_sdpa_and_stays_fp32_after_the_device_settings(monkeypatch, seed):
    from diffusers_npu import device as dev

    fake = install(monkeypatch, soc_version=SOC_910A)
    dev.apply_device_settings("npu")
    attn = make_attention(True, torch.float32)
    hidden, context, mask, _ = make_inputs(True, "additive", torch.float32)
    ref = reference(attn, hidden, context, mask)
    set_attention(attn, "auto")
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    assert attn.processor.path_counts == {"sdpa": 1} and not fake.calls_named("fp32_to_fp16")
    assert rel_err(out, ref) < 1e-5, f"seed {seed}"


def test_fusion_attention_env_override(monkeypatch):
    from diffusers_npu import device as dev

    install(monkeypatch, soc_version=SOC_910A)
    assert dev.npu_soc_name() == "Ascend910A" and not dev.npu_supports_fusion_attention()
    monkeypatch.setenv(dev.FUSION_ATTENTION_ENV, "1")
    assert dev.npu_supports_fusion_attention()
    install(monkeypatch)  # 910B2
    monkeypatch.setenv(dev.FUSION_ATTENTION_ENV, "0")
    assert not dev.npu_supports_fusion_attention()


def test_path_is_logged_once_per_model(caplog):
    unet, other = tiny_unet(), tiny_unet()
    with caplog.at_level(logging.INFO, logger="diffusers_npu.attention"):
        for _ in range(3):
            set_attention(unet, "auto")
        set_attention(other, "auto")
        set_attention(unet, "upcast")
    lines = [r.getMessage() for r in caplog.records if "set_attention(" in r.getMessage()]
    assert lines == [
        "set_attention(auto) on UNet2DConditionModel: SDPA for fp32, upcast for fp16/bf16 (cpu) [8 attention module(s)]",
        "set_attention(auto) on UNet2DConditionModel: SDPA for fp32, upcast for fp16/bf16 (cpu) [8 attention module(s)]",
        "set_attention(upcast) on UNet2DConditionModel: upcast (fp32 scores) [8 attention module(s)]",
    ]


def test_module_without_attention_is_quiet(caplog):
    """Textual inversion trains an Embedding: no warning, nothing changed, and a way to check first."""
    emb = torch.nn.Embedding(10, 4)
    assert count_attention_modules(emb) == 0 and count_attention_modules(tiny_unet()) == 8
    with caplog.at_level(logging.DEBUG, logger="diffusers_npu.attention"):
        assert set_attention(emb, "auto") is emb
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "Embedding has no diffusers Attention modules" in caplog.records[0].getMessage()


def test_per_head_mask_reaches_kernel_as_bnss(monkeypatch, seed):
    """A mask given per head ((B*heads, 1, K), diffusers' own layout) is BNSS; the kernel lists that too."""
    fake = install(monkeypatch)
    attn = make_attention(True, torch.float16)
    hidden, context, _, _ = make_inputs(True, "none", torch.float16)
    keep = torch.rand(B * HEADS, 1, K) > 0.4
    keep[..., 0] = True
    ref = reference(attn, hidden, context, keep)
    set_attention(attn, "flash")
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=context, attention_mask=keep)
    (call,) = fake.calls_named("npu_fusion_attention")
    assert call["mask_shape"] == (B, HEADS, Q, K)
    assert torch.equal(call["mask"], (~keep).view(B, HEADS, 1, K).expand(B, HEADS, Q, K))
    assert rel_err(out, ref) < TOL[torch.float16], f"seed {seed}"


# ------------------------------------------------------- the stand-in refuses what the kernel refuses
def _qkv(dtype=torch.float16, b=B, n=HEADS, sq=Q, skv=K, d=DIM_HEAD):
    return torch.randn(b, n, sq, d).to(dtype), torch.randn(b, n, skv, d).to(dtype), torch.randn(b, n, skv, d).to(dtype)


def test_stand_in_rejects_broadcast_mask_shapes(monkeypatch):
    fake = install(monkeypatch)
    q, k, v = _qkv()
    for shape in [(B, 1, 1, K), (1, HEADS, Q, K), (B, Q, K), (B, 1, Q, K + 1)]:
        with pytest.raises(RuntimeError, match="get unsupported atten_mask shape"):
            fake.npu_fusion_attention(q, k, v, HEADS, "BNSD", atten_mask=torch.zeros(shape, dtype=torch.bool))
    for shape in [(B, HEADS, Q, K), (B, 1, Q, K), (1, 1, Q, K), (Q, K)]:  # what the API page lists
        fake.npu_fusion_attention(q, k, v, HEADS, "BNSD", atten_mask=torch.zeros(shape, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool/uint8"):
        fake.npu_fusion_attention(q, k, v, HEADS, "BNSD", atten_mask=torch.zeros(B, 1, Q, K))


def test_stand_in_sdpa_follows_torch_npus_dispatch(monkeypatch):
    """Rule 9: before 26.1.0 torch_npu's SDPA hands the mask to the kernel as given ([B,1,1,S] refused) with
    inner_precise=0; from 26.1.0 it broadcasts and passes 2; a float mask runs the unfused math path."""
    import torch.nn.functional as F

    q, k, v = _qkv()
    keep = torch.ones(B, 1, 1, K, dtype=torch.bool)
    fake = install(monkeypatch, version="2.5.1")
    with pytest.raises(RuntimeError, match="get unsupported atten_mask shape"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(B, 1, 1, K, dtype=q.dtype))
    assert [c["fused"] for c in fake.calls_named("sdpa")] == [True, False]
    fake = install(monkeypatch, version="2.7.1.post8")
    F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    (call,) = fake.calls_named("npu_fusion_attention")
    assert call["via"] == "sdpa" and call["inner_precise"] == 2 and call["mask_shape"] == (B, HEADS, Q, K)


def test_stand_in_fully_masked_rows_need_inner_precise_2(monkeypatch):
    fake = install(monkeypatch)
    q, k, v = _qkv()
    drop = torch.zeros(B, 1, Q, K, dtype=torch.bool)
    drop[:, :, 0] = True  # query 0 sees no key
    lossy = fake.npu_fusion_attention(q, k, v, HEADS, "BNSD", atten_mask=drop, inner_precise=0)[0]
    precise = fake.npu_fusion_attention(q, k, v, HEADS, "BNSD", atten_mask=drop, inner_precise=2)[0]
    assert torch.isnan(lossy[:, :, 0]).all() and (precise[:, :, 0] == 0).all()
    assert torch.equal(lossy[:, :, 1:], precise[:, :, 1:])


def test_stand_in_rejects_fp32_big_heads_and_unsupported_soc(monkeypatch):
    fake = install(monkeypatch)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        fake.npu_fusion_attention(*_qkv(torch.float32), HEADS, "BNSD")
    with pytest.raises(ValueError, match="head dim must be 1..768"):
        fake.npu_fusion_attention(*_qkv(d=800), HEADS, "BNSD")
    with pytest.raises(ValueError, match="BNSD expects"):
        fake.npu_fusion_attention(*_qkv(), HEADS + 1, "BNSD")
    fake = install(monkeypatch, soc_version=SOC_910A)
    with pytest.raises(RuntimeError, match="not supported on Ascend910A"):
        fake.npu_fusion_attention(*_qkv(), HEADS, "BNSD")
