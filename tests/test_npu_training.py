"""The default NPU training set-up, checked with the strict torch_npu stand-in (issue #10's acceptance test).

``resolve_defaults`` for device ``npu`` and the Trainer's model preparation (``build.module_and_speed``) run
with tensors that report device type "npu": the stand-in refuses channels_last exactly like torch_npu's
_to_copy, so reaching the end of model preparation proves no conversion was attempted (and the negative
test shows the same preparation does fail when channels_last is forced). The loss scaler must be
torch_npu's own, and attention must follow the SoC gate: fusion attention on a 910B, upcast on a 910A.
"""
from __future__ import annotations

import types

import pytest
import torch

from diffusers_npu import presets
from diffusers_npu.errors import UsageError
from fake_torch_npu import SOC_910A, SOC_910B2, install

TEXT_TO_IMAGE = "text_to_image"


def resolved(argv, tmp_path, kind="npu"):
    from diffusers_npu.train.config import device_info, parse_args, resolve_defaults
    from diffusers_npu.train.registry import get_task

    task_cls = get_task(TEXT_TO_IMAGE)
    args = parse_args(task_cls, ["--pretrained_model_name_or_path", str(tmp_path / "model"),
                                 "--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                                 *argv])
    info = device_info(kind)
    return resolve_defaults(args, info, None, task_cls), info


@pytest.mark.parametrize("soc,fusion", [(SOC_910B2, True), (SOC_910A, False)])
def test_npu_defaults(monkeypatch, tmp_path, soc, fusion):
    install(monkeypatch, soc_version=soc)
    a, info = resolved([], tmp_path)
    assert info.kind == "npu" and info.fusion_attention is fusion
    assert a.device == "npu" and a.channels_last is False
    assert (a.mixed_precision, a.optimizer, a.attention) == ("bf16", "fused_adamw", "auto")
    with pytest.raises(UsageError, match="--channels_last is not supported on NPU"):
        resolved(["--channels_last"], tmp_path)


def test_first_generation_910_without_bf16_must_choose(monkeypatch, tmp_path):
    install(monkeypatch, soc_version=SOC_910A, bf16=False)
    a, _ = resolved([], tmp_path)
    assert a.mixed_precision == "no"
    with pytest.raises(UsageError, match="bf16 is not supported on this npu device"):
        resolved(["--mixed_precision", "bf16"], tmp_path)


class _Task:
    """The part of a task that model preparation uses: a tiny UNet as the trained module."""

    def __init__(self):
        self.unet = presets.build_components("tiny", with_tokenizer=False)["unet"]

    def build_module(self):
        return self.unet

    def attention_models(self):
        return [self.unet]

    def checkpointing_models(self):
        return [self.unet]

    def compile_models(self):
        return []


def _prepare(a):
    from diffusers_npu.train import build

    trainer = types.SimpleNamespace(args=a, task=_Task())
    return build.module_and_speed(trainer), trainer


@pytest.mark.parametrize("soc,kernel_calls", [(SOC_910B2, True), (SOC_910A, False)])
def test_npu_model_preparation(monkeypatch, tmp_path, soc, kernel_calls):
    fake = install(monkeypatch, soc_version=soc)
    a, _ = resolved(["--mixed_precision", "fp16", "--enable_npu_flash_attention", "--gradient_checkpointing"],
                    tmp_path)
    module, _ = _prepare(a)  # the stand-in raises on any channels_last request: none was made
    assert fake.calls_named("refused") == []
    assert all(p.is_contiguous() for p in module.parameters())
    sample = torch.randn(2, 4, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        module(sample, torch.tensor([1, 500]), torch.randn(2, 16, 32))
    assert bool(fake.calls_named("npu_fusion_attention")) is kernel_calls  # the SoC gate


def test_forced_channels_last_is_what_torch_npu_refuses(monkeypatch, tmp_path):
    """The negative control: the preparation above would have failed had it converted the UNet."""
    install(monkeypatch)
    a, _ = resolved([], tmp_path)
    a.channels_last = True
    with pytest.raises(RuntimeError, match="Only contiguous_format or preserve_format is supported"):
        _prepare(a)


@pytest.mark.parametrize("sharded", [False, True])
def test_npu_fp16_uses_torch_npus_scaler(monkeypatch, sharded):
    from diffusers_npu.train.precision import Precision

    fake = install(monkeypatch)
    precision = Precision("fp16", types.SimpleNamespace(type="npu"), sharded=sharded)
    expected = fake.npu.amp.sharded_grad_scaler._ShardedGradScaler if sharded else fake.npu.amp.GradScaler
    assert type(precision.scaler) is expected


def test_inference_benchmark_refuses_channels_last_on_npu(monkeypatch):
    """Issue #20 item 8: like training, the inference benchmark refuses --channels_last on for NPU, before
    building anything."""
    from diffusers_npu.benchmark import infer

    fake = install(monkeypatch)
    with pytest.raises(SystemExit, match="--channels_last on is not supported on NPU"):
        infer.main(["--device", "npu", "--channels_last", "on"])
    assert fake.calls_named("refused") == []  # refused by the flag check, not by the stand-in's memory-format rule
