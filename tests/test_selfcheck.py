"""The self-check (``diffusers-npu selfcheck`` / test/npu_selfcheck.sh) and the launcher environment
(test/env_npu.sh).

The numeric checks run in-process, on the CPU and against the strict torch_npu stand-in (so the NPU code
paths and the project's torch_npu calls are what gets checked); one short training run exercises the
training harness. The full self-check with all training runs is CI's ``bash test/npu_selfcheck.sh``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from diffusers_npu import cli
from diffusers_npu.selfcheck import numerics, run_selfcheck, training
from diffusers_npu.selfcheck.result import Result, format_table
from fake_torch_npu import SOC_910A, install

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_NUMERIC = 1 + 4 * 3 + 1 + 3 + 1 + 2 + 3  # fp32, attention modes x dtypes, overflow, optimizers, resume, clips,
N_REALSIZE = 4                              # scaler steps; real-size attention x 2 dtypes, fused kernel, UNet step


@pytest.fixture(autouse=True)
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def by_name(results):
    return {r.check: r for r in results}


def test_numeric_checks_pass_on_cpu():
    results = list(numerics.numeric_checks("cpu"))
    assert len(results) == N_NUMERIC
    failed = [(r.check, r.note) for r in results if r.result != "pass"]
    assert failed == []
    for r in results:
        if r.tolerance is not None:
            assert r.max_error < r.tolerance, r
    rows = by_name(results)
    assert "upcast_fp32 x6" in rows["attention auto fp16 (self+cross, masks)"].note  # CPU half: fp32-safe path
    assert rows["optimizer fused_adamw 20 steps vs float64 AdamW"].note == "AdamW (fused kernel)"
    assert "on the device" in rows["fp16 overflow step through the GradScaler (megatron_adamw)"].note


@pytest.mark.parametrize("soc", [221, SOC_910A])
def test_numeric_checks_drive_the_npu_paths_through_the_stand_in(monkeypatch, soc):
    """With torch_npu's stand-in, the same checks run the NPU code: fusion attention (where the SoC has it),
    NpuFusedAdamW and its fused clip, npu_apply_adam_w -- and every call passes the stand-in's rules."""
    from diffusers_npu import device as dev

    fake = install(monkeypatch, soc_version=soc)
    dev.apply_device_settings("npu")  # what the self-check does first on an NPU (910A: keep fp32)
    results = list(numerics.numeric_checks("cpu"))
    assert [(r.check, r.note) for r in results if r.result != "pass"] == []
    assert [r.check for r in results if r.fallback] == []  # every NPU path ran: nothing marked *
    rows = by_name(results)
    assert rows["optimizer fused_adamw resumed from a checkpoint vs uninterrupted"].note.startswith("NpuFusedAdamW")
    flash = rows["attention flash fp16 (self+cross, masks)"].note
    if soc == 221:
        assert "npu_fusion_attention x6" in flash and fake.calls_named("npu_fusion_attention")
    else:
        assert "upcast_fp32 x6" in flash and not fake.calls_named("npu_fusion_attention")
    assert rows["optimizer fused_adamw 20 steps vs float64 AdamW"].note == "NpuFusedAdamW"
    assert rows["clip fused_adamw vs clip_grad_norm_"].note.startswith("fused clip_grad_norm_fused_")
    assert len(fake.calls_named("npu_apply_adam_w")) >= 20 * 4  # 20 steps x 4 tensors of the small model
    assert "on the host" in rows["fp16 overflow step through the GradScaler (megatron_adamw)"].note


def test_fp32_rows_fail_when_the_device_computes_fp32_in_fp16(monkeypatch):
    """Issue #20 item 4: a 910A left at torch_npu's default (allow_fp32_to_fp16; the stand-in then rounds fp32
    matmuls to fp16) fails the fp32 rows; the project's device settings make them pass."""
    from diffusers_npu import device as dev

    fake = install(monkeypatch, soc_version=SOC_910A)
    rows = by_name(numerics.numeric_checks("cpu"))
    fp32_rows = ["fp32 matmul/linear stay fp32 (vs float64)", "attention auto fp32 (self+cross, masks)",
                 "attention default fp32 (self+cross, masks)"]
    assert [rows[n].result for n in fp32_rows] == ["FAIL"] * 3, [rows[n].max_error for n in fp32_rows]
    assert fake.calls_named("fp32_to_fp16")
    dev.apply_device_settings("npu")
    rows = by_name(numerics.numeric_checks("cpu"))
    assert [rows[n].result for n in fp32_rows] == ["pass"] * 3


def test_realsize_rows_under_the_stand_in(monkeypatch):
    """Real-size rows (at CPU sizes) run torch_npu's fused SDPA on a 910B; the fused-kernel row fails when a
    capable SoC did not use it, and the attention rows are then marked as a fallback."""
    from diffusers_npu import attention
    from diffusers_npu.selfcheck import realsize

    fake = install(monkeypatch)
    rows = list(realsize.attention_realsize_checks("cpu"))
    assert [(r.result, r.fallback) for r in rows] == [("pass", "")] * 2, [r.note for r in rows]
    assert "sdpa_npu_fused x15" in rows[0].note and fake.calls_named("sdpa")
    assert realsize.fused_kernel_check("cpu").result == "pass"
    monkeypatch.setattr(attention, "npu_auto_path", lambda dtype, masked: "upcast_fp32")  # a regression
    broken = realsize.fused_kernel_check("cpu")
    assert broken.result == "FAIL" and "took upcast_fp32" in broken.note
    (fp16, _) = realsize.attention_realsize_checks("cpu")
    assert fp16.fallback == "no fused NPU path ran on a SoC that has one"


def test_selfcheck_says_first_which_device_and_why(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(numerics, "numeric_checks", lambda device: iter([Result("x", "pass", fallback="cpu")]))
    from diffusers_npu.selfcheck import realsize

    monkeypatch.setattr(realsize, "realsize_checks", lambda device: iter([]))
    assert cli.main(["selfcheck", "--skip_training", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("diffusers-npu self-check: checking cpu (no NPU (")
    assert out[0].endswith("rows marked * ran a fallback, not the NPU path)")
    assert any(line.startswith("x ") and " pass* " in line and "FALLBACK: cpu" in line for line in out)
    assert "1 passed, 0 failed, 0 skipped (1 on a fallback, marked *: no NPU evidence)" in out[-1]


def test_a_wrong_result_fails_the_check_and_the_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(numerics, "OPTIMIZER_TOL", 1e-12)  # no fp32 optimizer meets this
    path = tmp_path / "out" / "sc.json"
    assert cli.main(["selfcheck", "--device", "cpu", "--skip_training", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    assert report["all_passed"] is False and report["counts"]["FAIL"] == 3
    failed = [r for r in report["results"] if r["result"] == "FAIL"]
    assert {r["check"] for r in failed} == {f"optimizer {n} 20 steps vs float64 AdamW" for n in numerics.OPTIMIZERS}
    out = capsys.readouterr().out
    for r in report["results"]:  # the printed table and the JSON hold the same rows
        assert r["check"] in out
    assert f"{report['counts']['pass']} passed, 3 failed, 1 skipped" in out  # the fused-kernel row on a CPU


def test_unsupported_dtype_is_a_skip_with_the_reason(monkeypatch):
    real = numerics.dtype_unsupported
    monkeypatch.setattr(numerics, "dtype_unsupported",
                        lambda device, name: "bf16 is not supported here" if name == "bf16" else real(device, name))
    report = run_selfcheck("cpu", training=False)
    skips = [r for r in report["results"] if r.result == "skip" and "bf16" in r.check]
    assert len(skips) == 5 and all(r.note == "bf16 is not supported here" for r in skips)
    counts = report["counts"]
    assert report["all_passed"] is True and (counts["pass"], counts["FAIL"], counts["skip"]) == \
        (N_NUMERIC + N_REALSIZE - 6, 0, 6)  # 5 bf16 rows and the fused-kernel row (no kernel on a CPU)


def test_table_and_json_rows():
    rows = [Result("a check", "pass", 1.5e-7, 1e-4, 0.25, "note"), Result("b", "skip", note="why")]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["check", "result", "max", "error", "time", "note"]
    assert table[2].split() == ["a", "check", "pass", "1.5e-07", "(<", "1e-04)", "0.2s", "note"]
    assert rows[0].as_json() == {"check": "a check", "result": "pass", "max_error": 1.5e-7, "tolerance": 1e-4,
                                 "seconds": 0.25, "note": "note"}
    assert Result("c", "FAIL", float("inf")).as_json()["max_error"] == "inf"


def test_training_run_harness(tmp_path, monkeypatch):
    """One real 2-step run through train.run("text_to_image", argv), as the full self-check does 12 times."""
    monkeypatch.setattr(training, "LAUNCHER_CONFIGS", training.LAUNCHER_CONFIGS[:1])
    monkeypatch.setattr(training, "OPTIMIZERS", (None,))
    (result,) = training.training_checks("cpu", str(tmp_path), steps=2)
    assert result.result == "pass", result.note
    assert result.note.startswith("no/adamw/auto, loss ")  # the CPU defaults the trainer chose
    assert result.argv[result.argv.index("--max_train_steps") + 1] == "2"
    assert result.argv[result.argv.index("--output_dir") + 1] == "<workdir>/runs/defaults-default"
    out = tmp_path / "runs" / "defaults-default"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_training_check_fails_when_nothing_trains(tmp_path, monkeypatch):
    model, _ = training.prepare_inputs(str(tmp_path))
    assert training._weights_moved(model, model) == "saved UNet equals the initial one: nothing was trained"


# ------------------------------------------------------------------------------- shell entry points
def _bash(script: str, env: dict, timeout: int = 300):
    full = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_NPU_DEVICE", "ASCEND_TOOLKIT_HOME")}
    full.update(env)
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _fake_cann(root, layouts):
    prefix = root / "Ascend"
    for layout in layouts:
        (prefix / layout).mkdir(parents=True)
        (prefix / layout / "set_env.sh").write_text(f"export DNPU_TEST_CANN={layout}\n")
    info = root / "ascend_cann_install.info"
    info.write_text(f"Install_Path={prefix}\n")
    return str(info)


@pytest.mark.parametrize("layouts,chosen", [(["ascend-toolkit", "nnae"], "ascend-toolkit"), (["nnae"], "nnae")])
def test_env_npu_finds_cann_from_the_install_info(tmp_path, layouts, chosen):
    info = _fake_cann(tmp_path, layouts)
    r = _bash('source test/env_npu.sh; echo "$DNPU_TEST_CANN $DIFFUSERS_NPU_CANN_ENV"',
              {"DIFFUSERS_NPU_CANN_INFO": info, "HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [chosen, str(tmp_path / "Ascend" / chosen / "set_env.sh")]


# What CANN's own set_env.sh does: expands the variables it extends without a default (set -u kills it).
CANN_LIKE_SET_ENV = """export ASCEND_TOOLKIT_HOME=/opt/fake-cann
export LD_LIBRARY_PATH=${ASCEND_TOOLKIT_HOME}/lib64:$LD_LIBRARY_PATH
export PYTHONPATH=${ASCEND_TOOLKIT_HOME}/python/site-packages:$PYTHONPATH
export DNPU_TEST_CANN=sourced
"""


def _cann_like(root):
    (root / "Ascend" / "ascend-toolkit").mkdir(parents=True)
    (root / "Ascend" / "ascend-toolkit" / "set_env.sh").write_text(CANN_LIKE_SET_ENV)
    info = root / "ascend_cann_install.info"
    info.write_text(f"Install_Path={root / 'Ascend'}\n")
    return str(info)


def _env_without(*names):
    return {k: v for k, v in os.environ.items() if k not in names + ("DIFFUSERS_NPU_DEVICE", "ASCEND_TOOLKIT_HOME")}


def test_env_npu_survives_set_u_with_a_cann_set_env_expanding_unset_variables(tmp_path):
    info = _cann_like(tmp_path)
    script = 'set -u; source test/env_npu.sh; echo "u=${-//[^u]/} $DNPU_TEST_CANN $LD_LIBRARY_PATH"'
    env = dict(_env_without("LD_LIBRARY_PATH", "PYTHONPATH"), DIFFUSERS_NPU_CANN_INFO=info, HOME=str(tmp_path))
    r = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["u=u", "sourced", "/opt/fake-cann/lib64:"]  # and -u is on again afterwards
    # the control: the same set_env.sh under set -u without env_npu.sh's guard dies as the issue says
    bare = subprocess.run(["bash", "-c", f"set -u; source {tmp_path}/Ascend/ascend-toolkit/set_env.sh"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode != 0 and "unbound variable" in bare.stderr


def _exported_by_env_npu():
    text = open(os.path.join(REPO, "test", "env_npu.sh"), encoding="utf-8").read()
    return sorted(set(re.findall(r"^export ([A-Z_]+)=", text, re.M)) - {"DIFFUSERS_NPU_CANN_ENV"})


def test_env_npu_keeps_every_exported_variable_and_guesses_no_hccl_if_ip(tmp_path):
    names = _exported_by_env_npu()
    assert {"TASK_QUEUE_ENABLE", "HCCL_CONNECT_TIMEOUT", "PYTORCH_NPU_ALLOC_CONF"} <= set(names)
    mine = {name: f"user-{i}" for i, name in enumerate(names + ["HCCL_IF_IP"])}
    show = "; ".join(f'echo "{n}=${{{n}-unset}}"' for n in mine)
    base = dict(_env_without(*mine), DIFFUSERS_NPU_CANN_INFO=str(tmp_path / "none"), HOME=str(tmp_path))
    r = subprocess.run(["bash", "-c", f"set -u; source test/env_npu.sh; {show}"], cwd=REPO,
                       env=dict(base, **mine), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"{n}={v}" for n, v in mine.items()]  # every exported value kept
    r = subprocess.run(["bash", "-c", f"source test/env_npu.sh; {show}"], cwd=REPO, env=base,
                       capture_output=True, text=True, timeout=60)
    got = dict(line.split("=", 1) for line in r.stdout.split())
    assert got["HCCL_IF_IP"] == "unset"  # HCCL chooses its own interface
    assert got["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"


def test_env_npu_is_loud_when_torch_npu_has_no_device(tmp_path):
    pkg = tmp_path / "pkg" / "torch_npu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import types, torch\n"
                                     "torch.npu = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)\n")
    env = {"PYTHONPATH": f"{tmp_path / 'pkg'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DIFFUSERS_NPU_CANN_INFO": str(tmp_path / "none"), "HOME": str(tmp_path)}
    r = _bash("source test/env_npu.sh", env)
    assert r.returncode == 0
    assert "WARNING: torch_npu is installed, but no Ascend NPU is usable here:" in r.stderr
    assert "reports no usable NPU (is_available()=False, device_count()=0)" in r.stderr
    assert "Training would run on the CPU" in r.stderr
    assert _bash("source test/env_npu.sh", {**env, "DIFFUSERS_NPU_DEVICE": "cpu"}).stderr == ""  # chosen on purpose


def test_env_npu_is_silent_without_torch_npu(tmp_path):
    r = _bash("source test/env_npu.sh", {"DIFFUSERS_NPU_CANN_INFO": str(tmp_path / "none"), "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stderr == ""


def test_npu_selfcheck_script(tmp_path):
    path = tmp_path / "sc.json"
    r = _bash(f"bash test/npu_selfcheck.sh --skip_training --device cpu --json {path}",
              {"DIFFUSERS_NPU_CANN_INFO": str(tmp_path / "none"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(path.read_text())
    assert report["all_passed"] and report["counts"]["pass"] == N_NUMERIC + N_REALSIZE - 1  # no fused kernel on a CPU: a skip
    assert report["environment"]["device"] == "cpu" and report["cpu_threads"].endswith("(OMP_NUM_THREADS=1)")


@pytest.mark.slow
def test_the_whole_npu_selfcheck_passes_on_cpu(tmp_path):
    """Issue #10's acceptance: `bash test/npu_selfcheck.sh` with its training runs passes in CI on CPU -- and
    issue #20's: with a CANN-like set_env.sh that expands unset variables, found where env_npu.sh looks,
    and LD_LIBRARY_PATH and PYTHONPATH unset."""
    path = tmp_path / "full.json"
    env = dict(_env_without("LD_LIBRARY_PATH", "PYTHONPATH"), DIFFUSERS_NPU_CANN_INFO=_cann_like(tmp_path),
               HOME=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "-c", f"bash test/npu_selfcheck.sh --device cpu --json {path}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report["all_passed"] and report["counts"]["pass"] > N_NUMERIC  # the training rows ran too
    assert report["counts"].get("fail", 0) == 0


def test_selfcheck_rejects_bad_flags(capsys):
    assert cli.main(["selfcheck", "--steps", "0", "--skip_training"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps must be >= 1 (got 0)"
    assert cli.main(["selfcheck", "--device", "tpu"]) == 2
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
