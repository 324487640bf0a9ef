"""Device layer: detection order, override validation, and the NPU settings contract (recording fake)."""
from __future__ import annotations

import random
import re
import sys

import numpy as np
import pytest
import torch

from diffusers_npu import device as dev
from fake_torch_npu import fake_npu, install, no_npu  # noqa: F401  (pytest fixtures)

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
    assert torch.npu.config.allow_internal_format is False
    assert fake_npu.calls_named("torch.npu.config.set") == [
        {"name": "torch.npu.config.set", "attr": "allow_internal_format", "value": False}
    ]
    assert fake_npu.calls_named("set_compile_mode") == [{"name": "set_compile_mode", "jit_compile": jit}]


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
    assert dev.device_name("npu:0") == "Ascend910B (fake)"
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
