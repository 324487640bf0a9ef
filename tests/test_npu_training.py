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


# ------------------------------------------------- issue #19 item 3: every 8-device script's default plan
def _scripts_8p():
    import glob
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for path in sorted(glob.glob(os.path.join(root, "test", "*8p*.sh"))):
        text = open(path, encoding="utf-8").read()
        match = re.search(r'^dnpu_launch (\S+)((?: --\S+)*) "\$@"$', text, re.M)
        if match:  # text_to_image_8p.sh takes positional settings: its variants are the scripts below
            found.append((os.path.basename(path), match.group(1), match.group(2).split()))
    return found


SCRIPTS_8P = _scripts_8p()


def _engine(a) -> str:
    return {"deepspeed": f"zero{a.zero_stage}"}.get(a.distributed, a.distributed)


def _planned_trainer_args(capsys, tmp_path, task, flags):
    """The trainer command line the launcher's dry run prints for 8 NPUs."""
    import shlex

    from diffusers_npu.launch import main as launch_main

    assert launch_main([f"--log_dir={tmp_path}", task, *flags, "--dry_run=1"]) == 0
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if ln.startswith("On 8 npu devices it would run: ")), None)
    if line is None:  # a machine that has the 8 NPUs: the plan itself is the 8-device one
        line = next(ln for ln in out.splitlines() if ln.startswith("Launch: "))
    argv = shlex.split(line.split(": ", 1)[1])
    script = next(i for i, tok in enumerate(argv) if tok.endswith(".py"))
    assert "--nproc_per_node" in argv and argv[argv.index("--nproc_per_node") + 1] == "8", line
    return argv[script + 1:]


def test_the_8p_scripts_are_found():
    assert len(SCRIPTS_8P) >= 15 and {t for _, t, _ in SCRIPTS_8P} >= {"text_to_image", "text_to_image_sdxl",
                                                                        "controlnet", "dreambooth"}


@pytest.mark.parametrize("script,task,flags", SCRIPTS_8P, ids=[s for s, _, _ in SCRIPTS_8P])
def test_8p_default_plan_builds_an_optimizer_its_engine_can_step(monkeypatch, capsys, tmp_path, script, task, flags):
    """Parse the launcher's dry run of each 8-device script, resolve the trainer's NPU defaults from the command
    it would run, and build + step that optimizer for that engine under the strict stand-in (FSDP: on DTensor
    parameters; ZeRO: with new .grad tensors each step, as DeepSpeed assigns them)."""
    from diffusers_npu.optim import build_optimizer
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults
    from diffusers_npu.train.registry import get_task

    trainer_argv = _planned_trainer_args(capsys, tmp_path, task, flags)
    task_cls = get_task(task)
    args = parse_args(task_cls, trainer_argv)
    a = resolve_defaults(args, DeviceInfo(kind="npu", supports_bf16=True, fusion_attention=True, world_size=8),
                         {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data")}, task_cls)
    engine = _engine(a)
    assert engine in ("ddp", "fsdp", "zero2", "zero3"), (script, a.distributed)
    fake = install(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    if engine == "fsdp":
        from test_optim import _dtensor_params

        params = _dtensor_params(model)
    try:
        opt = build_optimizer(a.optimizer, params, lr=1e-4, engine=engine)
        for _ in range(2):
            for p in params:
                grad = torch.full_like(p, 0.1)
                if engine == "fsdp" or engine.startswith("zero") or p.grad is None:
                    p.grad = grad  # FSDP2 and ZeRO hand the optimizer new gradient tensors
                else:
                    p.grad.copy_(grad)
            opt.step()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if engine in ("fsdp", "zero2", "zero3"):
        assert not fake.calls_named("NpuFusedAdamW.combine"), "the fused optimizer met a sharded engine"
