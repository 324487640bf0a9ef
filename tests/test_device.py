"""Device layer: detection order, override validation, and the NPU settings contract (recording fake)."""
from __future__ import annotations

import random
import re
import sys

import numpy as np
import pytest
import torch

from diffusers_npu import cputhreads
from diffusers_npu import device as dev
from diffusers_npu.errors import UsageError
from fake_torch_npu import SOC_910_9391, SOC_910A, SOC_950, fake_npu, install, no_npu  # noqa: F401  (fixtures)

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)


# ------------------------------------------------------------------------------------- detection
def test_auto_detects_npu_first(fake_npu):
    assert dev.detect_device() == "npu"
    assert dev.is_npu_available()
    assert dev.get_torch_npu() is fake_npu


def test_npu_without_devices_is_not_npu(monkeypatch):
    install(monkeypatch, device_count=0)
    assert not dev.is_npu_available()
    assert dev.detect_device() == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(RuntimeError, match="'npu' was requested.*no available device"):
        dev.detect_device("npu")


def test_no_torch_npu(no_npu):
    assert dev.get_torch_npu() is None
    assert not dev.is_npu_available()
    assert dev.detect_device() == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(RuntimeError, match=r"Device 'npu' was requested via the device argument.*torch_npu cannot be imported"):
        dev.detect_device("npu")


def test_get_torch_npu_caches_the_import_attempt(monkeypatch, no_npu):
    assert dev.get_torch_npu() is None
    # torch_npu becomes importable afterwards: the cached failure stands until the cache is reset.
    fake = object()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    assert dev.get_torch_npu() is None
    dev._reset_torch_npu_cache()
    assert dev.get_torch_npu() is fake


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU error")
def test_cuda_requested_but_absent(no_npu):
    with pytest.raises(RuntimeError, match="'cuda' was requested.*torch.cuda.is_available\\(\\) is False"):
        dev.detect_device("cuda")


def test_override_beats_env_and_env_beats_auto(monkeypatch, fake_npu):
    assert dev.detect_device("cpu") == "cpu"
    assert dev.detect_device("NPU:1") == "npu"  # indexed + case-insensitive -> bare type
    assert dev.detect_device(torch.device("cpu")) == "cpu"
    monkeypatch.setenv(dev.ENV_VAR, "cpu")
    assert dev.detect_device() == "cpu"
    assert dev.detect_device("npu") == "npu"
    monkeypatch.setenv(dev.ENV_VAR, "auto")
    assert dev.detect_device() == "npu"
    monkeypatch.setenv(dev.ENV_VAR, "")
    assert dev.detect_device() == "npu"


def test_unknown_device_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"Unknown device 'tpu' \(from the device argument\).*'npu', 'cuda', 'cpu'"):
        dev.detect_device("tpu")
    monkeypatch.setenv(dev.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"'gpu' \(from the DIFFUSERS_NPU_DEVICE environment variable\)"):
        dev.detect_device()


# -------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("jit", [False, True])
def test_apply_device_settings_npu(fake_npu, jit):
    applied = dev.apply_device_settings("npu:0", jit_compile=jit)
    assert applied == {"allow_internal_format": False, "jit_compile": jit}
    # The flag is write-only on real torch_npu: the recorded writes are the evidence, never a read-back.
    assert fake_npu.calls_named("torch.npu.config.set") == [
        {"name": "torch.npu.config.set", "attr": "allow_internal_format", "value": False}
    ]
    assert fake_npu.calls_named("set_compile_mode") == [{"name": "set_compile_mode", "jit_compile": jit}]


def test_910a_keeps_fp32_in_fp32(monkeypatch):
    """Below Ascend910B1 torch_npu starts in allow_fp32_to_fp16: the stand-in then computes fp32 matmuls in
    fp16 (rule 8) -- until the device settings set must_keep_origin_dtype."""
    fake = install(monkeypatch, soc_version=SOC_910A)
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    exact = a.double() @ a.double()
    lowered = float((torch.matmul(a, a).double() - exact).norm() / exact.norm())
    applied = dev.apply_device_settings("npu")
    assert applied["ACL_PRECISION_MODE"] == "must_keep_origin_dtype"
    assert fake.calls_named("set_option") == [{"name": "set_option",
                                               "option": {"ACL_PRECISION_MODE": "must_keep_origin_dtype"}}]
    kept = float((torch.matmul(a, a).double() - exact).norm() / exact.norm())
    assert lowered > 1e-4 > 1e-6 > kept  # fp16 (11 bits) before, fp32 after
    fake_a2 = install(monkeypatch)  # 910B: the default already keeps fp32, nothing is set
    assert "ACL_PRECISION_MODE" not in dev.apply_device_settings("npu") and not fake_a2.calls_named("set_option")
    with pytest.raises(ValueError, match="value of ACL_PRECISION_MODE should be in"):
        torch.npu.set_option({"ACL_PRECISION_MODE": "allow_fp32_to_fp32"})


def test_apply_device_settings_cpu_and_cuda(fake_npu):
    assert dev.apply_device_settings("cpu") == {}
    assert dev.apply_device_settings("cuda") == {}  # TF32 is opt-in
    before = torch.get_float32_matmul_precision()
    try:
        assert dev.apply_device_settings("cuda", allow_tf32=True)["float32_matmul_precision"] == "high"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert fake_npu.calls == []  # nothing NPU-ish happened for cpu/cuda
    with pytest.raises(ValueError, match="Unknown device"):
        dev.apply_device_settings("mps")


def test_npu_runtime_helpers_reach_torch_npu(fake_npu):
    dev.synchronize("npu")
    dev.empty_cache("npu")
    dev.reset_peak_memory("npu")
    assert [c["name"] for c in fake_npu.calls] == ["synchronize", "empty_cache", "reset_peak_memory_stats"]
    assert dev.peak_memory_bytes("npu") == 123456
    assert dev.device_name("npu:0") == "Ascend910B2"
    assert dev.supports_bf16("npu") is True
    assert dev.amp_device_type("npu:3") == "npu"


def test_npu_helpers_without_torch_npu(no_npu):
    with pytest.raises(RuntimeError, match="synchronize\\('npu'\\) needs torch_npu"):
        dev.synchronize("npu")
    assert dev.supports_bf16("npu") is False


def test_first_gen_910_has_no_bf16(monkeypatch):
    install(monkeypatch, bf16=False)
    assert dev.supports_bf16("npu") is False


def test_cpu_helpers_are_noops(fake_npu):
    for fn in (dev.synchronize, dev.empty_cache, dev.reset_peak_memory):
        assert fn("cpu") is None
    assert fake_npu.calls == []
    name = dev.device_name("cpu")
    assert re.fullmatch(rf"cpu \(.+, {torch.get_num_threads()} threads\)", name), name
    assert dev.peak_memory_bytes("cpu") > 10 * 2**20  # a python process with torch is > 10 MiB RSS
    assert dev.supports_bf16("cpu") is True
    assert dev.amp_device_type(torch.device("cpu")) == "cpu"
    assert dev.device_type(torch.device("cuda", 1)) == "cuda"
    assert dev.tensor_device_type(torch.zeros(1)) == "npu"  # the fixture's pretend-NPU seam


def test_tensor_device_type_is_the_real_device(no_npu):
    assert dev.tensor_device_type(torch.zeros(1)) == "cpu"


def test_seed_everything_is_reproducible(fake_npu):
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert dev.seed_everything(1234) == 1234
    first = draw()
    dev.seed_everything(1234)
    assert draw() == first
    dev.seed_everything(1235)
    assert draw() != first
    assert [c["seed"] for c in fake_npu.calls_named("manual_seed_all")] == [1234, 1234, 1235]


def test_seed_everything_does_not_import_torch_npu_needlessly(no_npu):
    dev.seed_everything(1)
    # The no_npu fixture leaves the cache unset; seeding must not have tried the import.
    assert dev._torch_npu_cache is dev._UNSET


# ------------------------------------------------------------------------------ SoC and status
# (SoC, torch_npu version) -> (name, explicit kernel, torch_npu's SDPA fused, SDPA masks with inner_precise=2).
# Expected values come from the stand-in's own tables (fake_torch_npu: SOC_NAMES, FUSION_KERNEL_SOCS,
# RELEASE_OF), i.e. from NpuVariables.h, the API pages and COMPATIBILITY.md -- not from src/.
@pytest.mark.parametrize("soc,version,name,kernel,sdpa,precise", [
    (221, "2.7.1.post8", "Ascend910B2", True, True, True),
    (225, "2.1.0.post10", "Ascend910B4-1", True, True, False),
    (SOC_910_9391, "2.5.1", "Ascend910_9391", True, True, False),
    (256, "2.12.0", "Ascend910_9363", True, True, True),
    (221, "2.1.0.post4", "Ascend910B2", True, False, False),      # 6.0.rc1: SDPA not yet fused
    (221, "2.2.0.post2", "Ascend910B2", True, True, False),       # 6.0.rc2: fused
    (SOC_950, "2.9.0.post2", "Ascend950", True, True, False),     # 26.0.0: the 950 in both
    (SOC_950, "2.8.0.post2", "Ascend950", False, False, False),   # 7.3.0: no 950 support yet
    (SOC_910A, "2.7.1.post8", "Ascend910A", False, False, True),  # first generation: nothing fused
    (104, "2.7.1.post8", "Ascend910B", False, False, True),
    (202, "2.7.1.post8", "Ascend310P3", False, False, True)])
def test_soc_and_release_gates(monkeypatch, soc, version, name, kernel, sdpa, precise):
    from fake_torch_npu import ASCEND910B1, FUSION_KERNEL_SOCS, SOC_NAMES, release_at_least

    install(monkeypatch, soc_version=soc, version=version)
    assert dev.npu_soc_name() == name and dev.torch_npu_version() == version
    assert dev.npu_supports_fusion_attention() is kernel
    assert dev.npu_sdpa_is_fused() is sdpa
    assert dev.npu_sdpa_masks_precise() is precise
    # the expectations above agree with the stand-in's own tables
    assert SOC_NAMES[soc].replace("_1", "-1") == name
    assert kernel == (soc in FUSION_KERNEL_SOCS or (soc == SOC_950 and release_at_least(version, "26.0.0")))
    assert sdpa == (soc >= ASCEND910B1 and release_at_least(version, "26.0.0" if soc == SOC_950 else "6.0.rc2"))


def test_every_soc_of_torch_npus_enum_is_named(monkeypatch):
    from fake_torch_npu import SOC_NAMES

    for soc, name in SOC_NAMES.items():
        install(monkeypatch, soc_version=soc)
        assert dev.npu_soc_name() == name.replace("_1", "-1"), soc  # the project writes 910B4-1 as CANN does


def test_fusion_attention_env_overrides_the_table(monkeypatch):
    install(monkeypatch, soc_version=SOC_910A)
    monkeypatch.setenv(dev.FUSION_ATTENTION_ENV, "1")
    assert dev.npu_supports_fusion_attention() is True
    monkeypatch.setenv(dev.FUSION_ATTENTION_ENV, "0")
    install(monkeypatch)
    monkeypatch.setenv(dev.FUSION_ATTENTION_ENV, "0")
    assert dev.npu_supports_fusion_attention() is False


def test_unknown_soc_version_falls_back_to_the_device_name(monkeypatch):
    fake = install(monkeypatch, soc_version=999)
    assert dev.npu_soc_name() == "Ascend(soc 999)"  # what the fake's get_device_name reports
    assert fake.calls_named("get_device_name") and dev.npu_supports_fusion_attention() is False


def test_npu_status_says_why(monkeypatch, no_npu):
    assert dev.npu_status() == (False, "torch_npu is not installed")
    monkeypatch.setattr(dev, "_torch_npu_cache", None)
    monkeypatch.setattr(dev, "_torch_npu_import_error", OSError("libascendcl.so: cannot open shared object file"))
    usable, why = dev.npu_status()
    assert not usable and "cannot be imported (OSError: libascendcl.so" in why and "set_env.sh" in why
    install(monkeypatch, device_count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "")
    usable, why = dev.npu_status()
    assert not usable and why.startswith("torch_npu imports but reports no usable NPU (is_available()=False, "
                                         "device_count()=0; ASCEND_RT_VISIBLE_DEVICES='')")
    install(monkeypatch, device_count=8)
    assert dev.npu_status() == (True, "8 NPU(s) usable (Ascend910B2)")


# ------------------------------------------------------------------------------------ GradScaler
def test_make_grad_scaler_npu_uses_torch_npus_own(fake_npu):
    scaler = dev.make_grad_scaler("npu:0", init_scale=1024.0)
    assert type(scaler) is fake_npu.npu.amp.GradScaler and scaler.get_scale() == 1024.0
    sharded = dev.make_grad_scaler("npu", sharded=True)
    # the private class, reached through torch's patched name; torch_npu has no public ShardedGradScaler
    assert type(sharded) is fake_npu.npu.amp.sharded_grad_scaler._ShardedGradScaler and sharded._device == "npu"
    assert not hasattr(fake_npu.npu.amp.sharded_grad_scaler, "ShardedGradScaler")
    assert [c["name"] for c in fake_npu.calls] == ["GradScaler", "_ShardedGradScaler"]
    assert dev.make_grad_scaler("npu", enabled=False).is_enabled() is False


def test_sharded_scaler_without_torchs_patch_uses_the_private_class(monkeypatch, fake_npu):
    from torch.distributed.fsdp import sharded_grad_scaler

    real = sharded_grad_scaler.ShardedGradScaler.__mro__[-2]  # torch.amp.GradScaler: not torch_npu's
    monkeypatch.setattr(sharded_grad_scaler, "ShardedGradScaler", real)
    assert type(dev.make_grad_scaler("npu", sharded=True)) is fake_npu.npu.amp.sharded_grad_scaler._ShardedGradScaler


@pytest.mark.parametrize("direction", ["cuda->npu", "npu->cuda"])
def test_scaler_state_crosses_devices(monkeypatch, direction):
    """A CUDA fp16 checkpoint's scaler state resumes on NPU (torch_npu's load_state_dict reads "dynamic") and
    the other way round; refusals say why."""
    torch_state = torch.amp.GradScaler("cpu", init_scale=512.0).state_dict()
    torch_state["scale"] = 512.0
    fake = install(monkeypatch)
    npu_scaler = dev.make_grad_scaler("npu", init_scale=2.0)
    if direction == "cuda->npu":
        with pytest.raises(KeyError, match="dynamic"):  # what resuming did before: the stand-in is the real class
            npu_scaler.load_state_dict(torch_state)
        npu_scaler.load_state_dict(dev.translate_scaler_state(torch_state, npu_scaler))
        assert npu_scaler.get_scale() == 512.0 and fake.calls_named("GradScaler")
    else:
        npu_state = dict(torch_state, dynamic=True)
        cpu_scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
        cpu_scaler.load_state_dict(dev.translate_scaler_state(npu_state, cpu_scaler))
        assert cpu_scaler.get_scale() == 512.0
        with pytest.raises(ValueError, match="static loss scale"):
            dev.translate_scaler_state(dict(npu_state, dynamic=False), cpu_scaler)
    with pytest.raises(ValueError, match="saved by a disabled scaler"):
        dev.translate_scaler_state({}, npu_scaler)


def test_precision_resume_translates_or_refuses(monkeypatch):
    import types

    from diffusers_npu.errors import CheckpointError
    from diffusers_npu.train.precision import Precision

    install(monkeypatch)
    p = Precision("fp16", types.SimpleNamespace(type="npu"))
    p.scaler.scale(torch.ones((), requires_grad=True))  # initialise the scale
    cuda_state = {"scaler": {"scale": 256.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                             "_growth_tracker": 3}, "skipped": 1, "consecutive": 0}
    p.load_state_dict(cuda_state)
    assert p.scaler.get_scale() == 256.0 and p.skipped == 1
    with pytest.raises(CheckpointError, match="cannot resume the fp16 loss scaler on npu: the checkpoint's "
                                               "loss-scaler state is empty"):
        p.load_state_dict({"scaler": {}})


def test_make_grad_scaler_elsewhere_is_torchs(no_npu):
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    cpu = dev.make_grad_scaler("cpu")
    assert type(cpu) is torch.amp.GradScaler and cpu._device == "cpu" and cpu.is_enabled()
    cuda = dev.make_grad_scaler("cuda", enabled=False)
    assert type(cuda) is torch.amp.GradScaler and cuda._device == "cuda"
    sharded = dev.make_grad_scaler("cpu", sharded=True)
    assert type(sharded) is ShardedGradScaler and sharded._device == "cpu"
    with pytest.raises(RuntimeError, match="make_grad_scaler\\('npu'\\) needs torch_npu"):
        dev.make_grad_scaler("npu")


def test_npu_grad_scaler_skips_an_overflow_step(fake_npu):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = dev.make_grad_scaler("npu", init_scale=2.0**10)
    scaler.scale(lin(torch.ones(1, 3)).sum()).backward()
    lin.weight.grad[0, 0] = float("inf")
    before = lin.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(lin.weight.detach(), before) and scaler.get_scale() == 2.0**9


# ------------------------------------------------------- the stand-in refuses what torch_npu refuses
def test_stand_in_scaler_steps_amp_aware_optimizers_with_grad_scaler_kwarg(fake_npu):
    """torch_npu's GradScaler.step passes grad_scaler=self to optimizers with _step_supports_amp_scaling:
    torch's fused AdamW (which has the flag) cannot take it -- so the project never builds it on NPU."""
    lin = torch.nn.Linear(3, 2)
    scaler = dev.make_grad_scaler("npu")
    fused = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    scaler.scale(lin(torch.ones(1, 3)).sum()).backward()
    with pytest.raises(TypeError, match="grad_scaler"):
        scaler.step(fused)
    from diffusers_npu.optim import build_optimizer

    for name in ("adamw", "fused_adamw", "megatron_adamw"):
        opt = build_optimizer(name, lin.parameters(), lr=0.1, grad_scaling=True)
        assert not getattr(opt, "_step_supports_amp_scaling", False), name
        scaler = dev.make_grad_scaler("npu")
        scaler.scale(lin(torch.ones(1, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)
    assert {c["protocol"] for c in fake_npu.calls_named("GradScaler.step")} == {"grad_scaler kwarg", "host found_inf"}



def test_stand_in_config_is_write_only(fake_npu):
    torch.npu.config.allow_internal_format = False
    with pytest.raises(AttributeError, match="allow_internal_format"):
        torch.npu.config.allow_internal_format  # noqa: B018  (reading is the wrong call)
    assert fake_npu.calls_named("torch.npu.config.set")[-1]["value"] is False


def test_stand_in_set_compile_mode_defaults_to_no_jit(fake_npu):
    fake_npu.npu.set_compile_mode()
    assert fake_npu.calls_named("set_compile_mode") == [{"name": "set_compile_mode", "jit_compile": False}]


def test_stand_in_refuses_channels_last_on_npu(monkeypatch):
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1))
    install(monkeypatch, pretend_npu=False)
    unet.to(memory_format=torch.channels_last)  # a CPU model: allowed
    unet.to(memory_format=torch.contiguous_format)
    fake = install(monkeypatch)
    with pytest.raises(RuntimeError, match="Only contiguous_format or preserve_format is supported"):
        unet.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="NPU contiguous operator only supported contiguous memory format"):
        torch.zeros(1, 2, 3, 4).contiguous(memory_format=torch.channels_last)
    unet.to(memory_format=torch.contiguous_format)  # the formats torch_npu accepts still pass
    unet.to(torch.float32)
    assert [c["call"] for c in fake.calls_named("refused")] == ["Tensor.to", "Tensor.contiguous"]


def test_stand_in_grad_scaler_takes_no_device_and_npu_tensors_only(monkeypatch):
    fake = install(monkeypatch)
    with pytest.raises(TypeError, match="takes no device"):
        fake.npu.amp.GradScaler("npu")
    install(monkeypatch, pretend_npu=False)
    with pytest.raises(ValueError, match="Device type of outputs should be npu"):
        fake.npu.amp.GradScaler().scale(torch.ones(()))


# ------------------------------------------------------------------------------------ CPU threads
@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_respect_omp_num_threads(monkeypatch, threads_restored):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dev.configure_cpu_threads() == (3, "CPU threads: 3 per process (OMP_NUM_THREADS=3)")
    assert torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")
    assert dev.configure_cpu_threads(local_world_size=4)[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(UsageError, match="OMP_NUM_THREADS='many' is not a positive whole number"):
        dev.configure_cpu_threads()


def test_cpu_threads_share_and_probe(monkeypatch, threads_restored):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cputhreads, "available_cpu_cores", lambda: 4)
    probed = []
    monkeypatch.setattr(cputhreads, "_thread_probe", lambda n: probed.append(n) or speed[0])
    assert dev.configure_cpu_threads(local_world_size=4) == (
        1, "CPU threads: 1 per process (4 core(s) for 4 process(es) on this machine)")
    assert probed == []  # one core each: nothing to decide
    speed = [1.8]
    threads, why = dev.configure_cpu_threads(local_world_size=2)
    assert (threads, probed, torch.get_num_threads()) == (2, [2], 2) and "2 threads 1.8x as fast as 1" in why
    speed[0] = 0.6  # the other cores are busy: more threads would be slower
    threads, why = dev.configure_cpu_threads()
    assert threads == 1 and torch.get_num_threads() == 1 and "only 0.60x" in why and "OMP_NUM_THREADS" in why


def test_thread_probe_measures_and_restores(threads_restored):
    torch.set_num_threads(1)
    ratio = cputhreads._thread_probe(2, budget_s=0.02)
    assert 0 < ratio < 100 and torch.get_num_threads() == 1


# ------------------------------------------------------------------------- README install path
def test_readme_ascend_install_path_matches_setup_py_and_requirements():
    """Issue #20 item 10: the README's Ascend rows pair torch with the torch_npu built for it, inside the torch
    range requirements.txt allows; the extras it installs exist in setup.py (npu -> torch_npu); extras are
    installed from the checkout, never as "diffusers-npu[...]" from the package index."""
    import ast
    import os

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    setup = ast.parse(open(os.path.join(root, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    assert any(req.replace("-", "_").startswith("torch_npu") for req in extras["npu"])
    torch_range = next(line.split("#")[0].strip()[len("torch"):] for line in
                       open(os.path.join(root, "requirements.txt"), encoding="utf-8") if line.startswith("torch>="))
    rows = re.findall(r"^\| (\d+\.\d+\.\d+) \| (\d+\.\d+\.\d+) \| (\d+\.\d+\.\d+(?:\.post\d+)?) \| CANN ([\w.]+) \| "
                      r"([\w.]+) \|$", readme, re.M)
    assert len(rows) >= 4
    for torch_v, vision_v, npu_v, _cann, _release in rows:
        assert npu_v.split(".post")[0] == torch_v  # torch_npu X.Y.Z[.postN] is built for torch X.Y.Z
        assert Version(torch_v) in SpecifierSet(torch_range), (torch_v, torch_range)
        minor = int(torch_v.split(".")[1])
        assert vision_v.startswith(f"0.{minor + 15}."), (torch_v, vision_v)  # torchvision 0.(minor+15) pairs
    installs = re.findall(r'pip install -e "\.\[([\w,]+)\]"', readme)
    assert "npu" in ",".join(installs)
    for group in installs:
        for extra in group.split(","):
            assert extra in extras, extra
    assert "diffusers-npu[" not in readme  # an unrelated package of that name exists on the index
