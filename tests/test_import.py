"""Import hygiene: ``import diffusers_npu`` is fast and lazy, and never imports torch_npu by itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# A torch_npu that IS importable (and says so when imported), put first on PYTHONPATH of a subprocess,
# so "torch_npu not in sys.modules" proves we did not import it -- not merely that it is not installed.
FAKE_TORCH_NPU = "import sys\nsys.stderr.write('fake torch_npu imported\\n')\n"

PROBE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import diffusers_npu
    t_pkg = time.perf_counter() - t0
    report = {"t_pkg": t_pkg, "after_pkg": sorted(m for m in ("torch_npu", "diffusers", "torch") if m in sys.modules)}
    import diffusers_npu.device
    report["after_device"] = sorted(m for m in ("torch_npu", "diffusers") if m in sys.modules)
    import diffusers_npu.optim
    report["after_optim"] = sorted(m for m in ("torch_npu", "diffusers") if m in sys.modules)
    fn = diffusers_npu.build_optimizer, diffusers_npu.clip_grad_norm
    report["lazy_names"] = [f.__module__ + "." + f.__name__ for f in fn]
    # Only asking for the device actually tries torch_npu (shows the fake above was importable).
    diffusers_npu.detect_device()
    report["after_detect"] = "torch_npu" in sys.modules
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    fake_dir = tmp_path_factory.mktemp("fake_npu_path")
    (fake_dir / "torch_npu.py").write_text(FAKE_TORCH_NPU)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("DIFFUSERS_NPU_DEVICE", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_import_package_is_fast_and_lazy(probe):
    report, _ = probe
    assert report["t_pkg"] < 5.0, f"import diffusers_npu took {report['t_pkg']:.2f}s"
    assert "torch_npu" not in report["after_pkg"]
    assert "diffusers" not in report["after_pkg"]


def test_device_and_optim_do_not_import_torch_npu_or_diffusers(probe):
    report, _ = probe
    assert report["after_device"] == []
    assert report["after_optim"] == []
    assert report["lazy_names"] == ["diffusers_npu.optim.build_optimizer", "diffusers_npu.optim.clip_grad_norm"]


def _imported_modules(module):
    import ast

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." if node.level else node.module.split(".")[0])
    return found


def test_attention_and_optim_never_import_torch_npu_themselves():
    """Only device.py may import torch_npu. (Checked statically: importing attention pulls in diffusers,
    which is too slow for another subprocess.)"""
    import diffusers_npu
    import diffusers_npu.attention as attention
    import diffusers_npu.optim as optim

    for module in (attention, optim):
        assert "torch_npu" not in _imported_modules(module), module.__name__
    assert diffusers_npu.set_attention is attention.set_attention


def test_fake_torch_npu_was_importable(probe):
    """Guards the negative checks above: torch_npu could be imported, and detect_device did so."""
    report, stderr = probe
    assert report["after_detect"] is True
    assert stderr.count("fake torch_npu imported") == 1


def test_device_module_imports_no_project_or_diffusers_modules():
    """The device layer sits at the bottom: it may import the standard library, torch, numpy and the
    dependency-free errors module, never diffusers or other project modules."""
    import diffusers_npu.device as dev

    imported = _imported_modules(dev)
    allowed = set(sys.stdlib_module_names) | {"__future__", "torch", "numpy", "torch_npu", ".", ".errors", "errors"}
    assert imported <= allowed, imported - allowed
    assert not {m for m in imported if m.startswith("diffusers") or m.startswith(".") and m not in (".", ".errors")}
