"""test/*.sh launch scripts: ModelZoo summary lines, CaseName.log, failures, 8p/multi-node dry runs, and the
embedded default's learning check (the README's main job, run to the end)."""
import json
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL_RE = {
    "fps": re.compile(r"^Final Performance images/sec : ([0-9.]+)$", re.M),
    "loss": re.compile(r"^Final Train Loss : ([0-9.]+)$", re.M),
    "e2e": re.compile(r"^E2E Training Duration sec : ([0-9]+)$", re.M),
}
CASE_KEYS = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
             "ActualLoss", "E2ETrainingTime"]


def launch(script, *args, device_id="t", env=None, timeout=1800):
    e = dict(os.environ, ASCEND_DEVICE_ID=device_id, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(["bash", os.path.join(REPO, "test", script), *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=REPO)


@pytest.fixture
def device_id(request):
    did = f"pytest-{request.node.name[:40]}-{os.getpid()}"
    yield did
    shutil.rmtree(os.path.join(REPO, "test", "output", did), ignore_errors=True)


def parse_case_log(path):
    out = {}
    for line in open(path):
        k, _, v = line.partition(" = ")
        out[k.strip()] = v.strip()
    return out


def check_summary_lines(stdout, case_log, batch, world=1):
    assert "------------------ Final result ------------------" in stdout
    vals = {k: float(r.search(stdout).group(1)) for k, r in FINAL_RE.items()}
    assert vals["fps"] > 0 and vals["e2e"] >= 1
    case = parse_case_log(case_log)
    assert list(case) == CASE_KEYS
    assert case["RankSize"] == str(world) and case["BatchSize"] == str(batch)
    assert case["CaseName"].endswith(f"_bs{batch}_{world}p_acc")
    for k in ("ActualFPS", "TrainingTime", "ActualLoss", "E2ETrainingTime"):
        float(case[k])  # parses to a number
    assert float(case["ActualFPS"]) == pytest.approx(vals["fps"])
    assert float(case["TrainingTime"]) == pytest.approx(batch * 1000 / vals["fps"], rel=1e-2)
    return vals, case


def test_1p_launcher_short_run_summary(tmp_path, device_id, embedded_paths):
    out = tmp_path / "run"
    r = launch("train_full_1p_text_to_image.sh", "--max_train_steps=3", "--batch_size=8", f"--output_dir={out}",
               "--extra_args=--no-learning_check --checkpointing_steps=2", device_id=device_id)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    case_log = os.path.join(REPO, "test", "output", device_id, "StableDiffusion_text_to_image_bs8_1p_acc.log")
    check_summary_lines(r.stdout, case_log, batch=8)
    log = open(os.path.join(REPO, "test", "output", device_id, f"train_{device_id}.log")).read()
    assert re.search(r"step_loss=[0-9.]+ FPS: [0-9.]+", log)
    # Rerunning the same command continues from the newest checkpoint rather than starting over.
    r2 = launch("train_full_1p_text_to_image.sh", "--max_train_steps=4", "--batch_size=8", f"--output_dir={out}",
                "--extra_args=--no-learning_check --checkpointing_steps=2", device_id=device_id)
    assert r2.returncode == 0, r2.stderr[-2000:]
    log = open(os.path.join(REPO, "test", "output", device_id, f"train_{device_id}.log")).read()
    assert "resumed from" in log and "step 4/4" in log and "step 1/4" not in log


def test_launcher_failure_exits_nonzero_with_log_tail(tmp_path, device_id):
    r = launch("train_full_1p_text_to_image.sh", f"--model_name={tmp_path / 'nope'}", "--max_train_steps=1",
               f"--output_dir={tmp_path / 'o'}", device_id=device_id)
    assert r.returncode != 0
    assert "Training failed" in r.stderr and "does not exist" in r.stderr
    r = launch("train_full_1p_text_to_image.sh", "--bogus=1", device_id=device_id)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr


@pytest.mark.parametrize("script", ["train_full_8p_text_to_image_sd2-1_fp16_fa.sh",
                                    "train_performance_8p_text_to_image_sd1-5_fp32.sh"])
def test_8p_dry_run_prints_exact_launch_commands(script, device_id):
    r = launch(script, "--dry_run=1", "--model_name=/models/sd", device_id=device_id)
    assert r.returncode == 0, r.stderr
    assert "world=8" in r.stdout
    launch_line = next(l for l in r.stdout.splitlines() if l.startswith("Launch: "))
    assert "--num_processes=8" in launch_line or "--nproc_per_node=8" in launch_line
    assert "--pretrained_model_name_or_path=/models/sd" in launch_line
    assert "--resume_from_checkpoint=latest" in launch_line
    if "fp16_fa" in script:
        assert "--enable_npu_flash_attention" in launch_line and "--train_batch_size=24" in launch_line
        assert "--resolution=768" in launch_line and "--use_ema" in launch_line
    else:
        assert "--mixed_precision=no" in launch_line and "--max_train_steps=1000" in launch_line
    # Two nodes: 16 processes in all, this node's rank and the master address are passed through.
    r = launch(script, "--dry_run=1", "--model_name=/models/sd", device_id=device_id,
               env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "PORT": "29600"})
    assert r.returncode == 0
    line = next(l for l in r.stdout.splitlines() if l.startswith("Launch: "))
    assert "world=16" in r.stdout
    assert ("--nnodes=2" in line and "--node_rank=1" in line and "--master_addr=10.0.0.1" in line) or \
           ("--num_machines=2" in line and "--machine_rank=1" in line and "--main_process_ip=10.0.0.1" in line)
    assert "29600" in line


@pytest.mark.slow
def test_embedded_default_learns_the_digits(tmp_path, device_id, embedded_paths):
    """The README's main job, end to end: the generated digit matches the prompt >= 90% of the time."""
    out = tmp_path / "digits"
    r = launch("train_full_1p_text_to_image.sh", f"--output_dir={out}", device_id=device_id, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    case_log = os.path.join(REPO, "test", "output", device_id, "StableDiffusion_text_to_image_bs64_1p_acc.log")
    vals, _ = check_summary_lines(r.stdout, case_log, batch=64)
    summary = json.load(open(out / "train_summary.json"))
    check = summary["learning_check"]
    print("learning check:", json.dumps(check), "e2e seconds:", vals["e2e"])
    assert check["images"] == 100
    assert check["agreement"] >= 0.90, check
    assert re.search(r"^Learning check: [0-9.]+% of 100", r.stdout, re.M)
