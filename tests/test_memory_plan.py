"""The memory plan (issue #21 item 4): bytes per rank of parameters, gradients and optimizer state for the
chosen engine and world size, printed at start-up, and a one-line refusal naming the options that would fit.

The FLUX.1-dev transformer is built on the meta device from its preset config (no weights allocated).
"""
from __future__ import annotations

import os

import pytest

from trainkit import argv, main_rc

from diffusers_npu.dit_presets import build_transformer
from diffusers_npu.train import memory_plan as mp

GB = 1e9


@pytest.fixture(scope="module")
def flux_dev():
    return build_transformer("flux1-dev")  # meta device: 11.9 B parameters, no memory


def test_flux_dev_full_fine_tuning_refused_under_ddp_and_fits_under_fsdp_on_8_devices_of_64_gb(flux_dev):
    n = sum(p.numel() for p in flux_dev.parameters())
    assert 11.8e9 < n < 12.0e9  # FLUX.1-dev's published size
    ddp = mp.plan_for(flux_dev, "ddp", 8, "bf16", "adamw", device_bytes=64 * GB)
    # fp32 weights 4 + fp32 gradients 4 + two fp32 AdamW moments 8 = 16 bytes per parameter on every rank
    assert ddp.parts() == {"parameters": 4 * n, "gradients": 4 * n, "optimizer": 8 * n, "frozen_models": 0}
    assert not ddp.fits()
    message = mp.refusal(ddp)
    assert "\n" not in message and f"{16 * n / GB:.1f} GB per rank" in message and "57.6 GB usable" in message
    for option in ("--distributed fsdp (fits from 4 devices) (23.8 GB per rank)",
                   "--distributed deepspeed --zero_stage 3 (fits from 4 devices)", "LoRA (--use_lora"):
        assert option in message, (option, message)

    from diffusers_npu.train.registry import find_task

    default = find_task("dreambooth_flux").defaults["distributed"]  # FLUX.1 full fine-tuning's default engine
    assert default == "fsdp" and find_task("dreambooth_lora_flux").defaults["distributed"] == "ddp"
    fsdp = mp.plan_for(flux_dev, default, 8, "bf16", "adamw", device_bytes=64 * GB)
    assert fsdp.fits() and fsdp.total == pytest.approx(16 * n / 8)
    assert "fsdp over 8 rank(s)" in fsdp.describe() and "= 23.80 GB of 64.0 GB" in fsdp.describe()

    # DeepSpeed in bf16: half-precision model and gradients + fp32 master copy and moments (ZeRO paper's 2+2+12)
    zero2 = mp.plan_for(flux_dev, "deepspeed", 8, "bf16", "adamw", zero_stage=2, device_bytes=64 * GB)
    assert zero2.total == pytest.approx(2 * n + (2 + 12) * n / 8) and zero2.fits()
    zero3 = mp.plan_for(flux_dev, "deepspeed", 8, "bf16", "adamw", zero_stage=3, device_bytes=64 * GB)
    assert zero3.total == pytest.approx(16 * n / 8)
    # LoRA: the frozen model in bf16 on every rank (ddp); 8-bit AdamW keeps 2 bytes of moments
    flux_dev.requires_grad_(False)
    try:
        lora = mp.plan_for(flux_dev, "ddp", 8, "bf16", "adamw", device_bytes=64 * GB)
        assert lora.total == 2 * n and lora.fits() and "LoRA" in lora.describe()
    finally:
        flux_dev.requires_grad_(True)
    assert mp.plan_for(flux_dev, "ddp", 1, "no", "adamw_8bit").total == (4 + 4 + 2) * n
    # one device of 64 GB: only LoRA fits, and more devices
    one = mp.plan_for(flux_dev, "ddp", 1, "bf16", "adamw", device_bytes=64 * GB)
    options = [what for what, _ in mp.options_that_fit(one)]
    assert options == ["4 or more devices with --distributed fsdp",
                       "4 or more devices with --distributed deepspeed --zero_stage 3",
                       "LoRA (--use_lora or the task's LoRA script)"]


def test_a_run_prints_its_plan_and_a_plan_that_cannot_fit_is_one_line_exit_2_nothing_written(tmp_path, capsys,
                                                                                              monkeypatch):
    rc, out, err = main_rc("text_to_image", argv(tmp_path / "ok", 1, batch=2), capsys)
    assert rc == 0, err
    line = next(l for l in out.splitlines() if l.startswith("Memory plan per rank"))
    assert "one process over 1 rank(s)" in line and "(CPU: not checked against memory)" in line
    monkeypatch.setenv("DIFFUSERS_NPU_DEVICE_MEMORY_GB", "0.01")  # a declared 10 MB device
    rc, out, err = main_rc("text_to_image", argv(tmp_path / "no", 1, batch=2), capsys)
    assert rc == 2
    lines = [l for l in err.splitlines() if "memory plan:" in l]
    assert len(lines) == 1 and "more than the 0.0 GB usable of this 0.0 GB device; options that fit" in lines[0]
    assert not os.path.exists(tmp_path / "no" / "unet")
    monkeypatch.setenv("DIFFUSERS_NPU_DEVICE_MEMORY_GB", "lots")
    rc, _, err = main_rc("text_to_image", argv(tmp_path / "bad", 1, batch=2), capsys)
    assert rc == 2 and "DIFFUSERS_NPU_DEVICE_MEMORY_GB='lots': expected a number of GB" in err


def test_flux_controlnet_with_upstreams_default_blocks_needs_fsdp_on_8_devices_of_64_gb(flux_dev):
    """The FLUX ControlNet launchers' engine: upstream's default 4 double + 4 single blocks (2.0 B trained
    parameters) beside the frozen FLUX.1-dev transformer and T5 v1.1 XXL (bf16) do not fit 64 GB under DDP; under
    FSDP, the task's multi-process default, they do."""
    import torch
    from diffusers import FluxControlNetModel
    from transformers import T5Config, T5EncoderModel

    from diffusers_npu.dit_presets import T5_XXL
    from diffusers_npu.train.registry import find_task
    from diffusers_npu.train.sd import Frozen

    keep = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    with torch.device("meta"):
        net = FluxControlNetModel(**{k: flux_dev.config[k] for k in keep}, num_layers=4, num_single_layers=4)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    module = torch.nn.Module()
    module.controlnet = net
    module.frozen = Frozen(transformer=flux_dev.requires_grad_(False), text_encoder_2=t5)
    try:
        assert 1.9e9 < sum(p.numel() for p in net.parameters()) < 2.1e9
        ddp = mp.plan_for(module, "ddp", 8, "bf16", "adamw", device_bytes=64 * GB)
        default = find_task("controlnet_flux").defaults["distributed"]
        fsdp = mp.plan_for(module, default, 8, "bf16", "adamw", device_bytes=64 * GB)
        assert not ddp.fits() and default == "fsdp" and fsdp.fits()
    finally:
        flux_dev.requires_grad_(True)
