"""NPU paths of the diffusion transformers (issue #21 item 5) under the strict stand-in
(tests/fake_torch_npu.py, rules 8 and 9): the q/k RMSNorms through ``torch_npu.npu_rms_norm`` with gamma in
the activations' dtype, FLUX's dispatching attention pinned to SDPA (never ``_native_npu`` with context
parallelism), and the device memory the memory plan reads.
"""
from __future__ import annotations

import pytest
import torch

from fake_torch_npu import fake_npu  # noqa: F401 (fixture)

from diffusers_npu import device as dev
from diffusers_npu.attention import set_attention
from diffusers_npu.npu_norm import FusedRMSNorm, use_fused_rms_norm
from diffusers_npu.tiny_pipelines import flux_transformer


def _flux_inputs(seed=0, tokens=16, txt=8):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, tokens, 4, generator=g),
                encoder_hidden_states=torch.randn(2, txt, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(txt, 3), guidance=torch.tensor([3.5, 3.5]),
                return_dict=False)


def test_flux_norms_and_attention_take_the_npu_paths_and_match_the_reference(fake_npu, monkeypatch):  # noqa: F811
    reference = flux_transformer(guidance_embeds=True)
    model = flux_transformer(guidance_embeds=True)
    n_norms = sum(isinstance(m, torch.nn.RMSNorm) for m in model.modules())
    assert use_fused_rms_norm(model) == n_norms == 6  # q/k (+ added q/k) of the double block, q/k of the single
    assert set(model.state_dict()) == set(reference.state_dict())  # checkpoints unchanged
    set_attention(model, "auto")
    backends = {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")}
    assert backends == {"native"}

    inputs = _flux_inputs()
    with torch.no_grad():
        want = reference(**inputs)[0]
    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    fused_before = len(fake_npu.calls_named("npu_fusion_attention"))  # the reference's SDPA calls
    with torch.no_grad():
        got = model(**inputs)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # every attention went through SDPA; the stand-in's SDPA, like torch_npu's on this SoC and release, runs the
    # fusion kernel inside it (one kernel call per SDPA call, none of the project's explicit calls besides)
    assert len(sdpa_calls) == 2 and len(fake_npu.calls_named("npu_fusion_attention")) - fused_before == len(sdpa_calls)
    assert len(fake_npu.calls_named("npu_rms_norm")) == 6

    # Training setting: fp32 weights, bf16 autocast -- the stand-in refuses a gamma of another dtype, so this
    # passes only because FusedRMSNorm casts gamma to the activations' dtype; gradients reach the weights.
    before = len(fake_npu.calls_named("npu_rms_norm"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)[0]
    out.float().pow(2).mean().backward()
    assert {c["dtype"] for c in fake_npu.calls_named("npu_rms_norm")[before:]} == {torch.bfloat16}
    norm = next(m for m in model.modules() if isinstance(m, FusedRMSNorm))
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()


def test_stand_in_rejects_rms_norm_calls_the_kernel_refuses(fake_npu):  # noqa: F811
    x = torch.randn(2, 4, 8)
    with pytest.raises(TypeError, match="gamma dtype"):
        fake_npu.npu_rms_norm(x.bfloat16(), torch.ones(8), epsilon=1e-6)
    with pytest.raises(ValueError, match="2-8 dimensions"):
        fake_npu.npu_rms_norm(torch.randn(8), torch.ones(8))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fake_npu.npu_rms_norm(x.double(), torch.ones(8).double())
    with pytest.raises(ValueError, match="trailing shape"):
        fake_npu.npu_rms_norm(x, torch.ones(4))
    # the unfused path (what would reach diffusers' branch): fp32 gamma with bf16 activations is refused
    with pytest.raises(TypeError, match="gamma dtype"):
        fake_npu.npu_rms_norm(x.bfloat16(), torch.nn.RMSNorm(8).weight)


def test_native_npu_attention_is_refused_with_context_parallelism_and_device_memory_is_read(fake_npu,  # noqa: F811
                                                                                            monkeypatch):
    monkeypatch.setenv(dev.DIT_ATTENTION_ENV, "_native_npu")
    assert dev.dit_attention_backend() == "_native_npu"
    with pytest.raises(ValueError, match="context parallelism: diffusers' NPU attention has no backward"):
        dev.dit_attention_backend(context_parallel=True)
    model = flux_transformer()
    for m in model.modules():
        if hasattr(m, "processor") and hasattr(m.processor, "_parallel_config"):
            m.processor._parallel_config = object()  # as diffusers' enable_parallelism sets it
    with pytest.raises(ValueError, match="context parallelism"):
        set_attention(model, "auto")
    monkeypatch.setenv(dev.DIT_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="expected one of native, _native_npu"):
        dev.dit_attention_backend()
    monkeypatch.delenv(dev.DIT_ATTENTION_ENV)
    assert dev.device_memory_bytes("npu") == 64 * 1024 ** 3  # torch_npu.npu.get_device_properties
    monkeypatch.setenv(dev.DEVICE_MEMORY_ENV, "32")
    assert dev.device_memory_bytes("npu") == 32e9  # declared wins
