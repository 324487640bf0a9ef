"""The launcher (``diffusers-npu launch`` / ``python -m diffusers_npu.launch``) and the test/*.sh scripts.

Plans and dry runs run the launcher in-process. Runs whose point is the child process use a fake trainer
(a small script written below that follows the trainer's output and summary contract) so that progress,
log appending, pre-emption and failures take a second each; two tests run the real trainer (1 and 2
processes, a few steps) and the slow one runs the README's main job to the end.
"""
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from diffusers_npu import cli
from diffusers_npu.cliutil import ArgumentParser
from diffusers_npu import launch
from diffusers_npu.launch import devices, report
from diffusers_npu.launch.progress import Progress, StepLine
from diffusers_npu.launch.variants import SD3_TABLE as SD3_VARIANTS, TABLE as VARIANTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
EXAMPLE = {"text_to_image": "examples/text_to_image/train_text_to_image.py",
           "dreambooth": "examples/dreambooth/train_dreambooth.py",
           "textual_inversion": "examples/textual_inversion/textual_inversion.py",
           "controlnet": "examples/controlnet/train_controlnet.py"}
CASE_KEYS = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
             "ActualLoss", "E2ETrainingTime"]

# A stand-in trainer that keeps the contract: one `step N/M step_loss=L FPS: F lr=X` line per step, a
# train_summary.json with parts and totals, a resumable state, exit 4 below the learning check, and a clean
# pre-emption on SIGTERM. FAKE_MODE picks the behaviour.
FAKE_TRAINER = textwrap.dedent('''
    import argparse, json, os, signal, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir"); p.add_argument("--max_train_steps", type=int, default=6)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--learning_check", action=argparse.BooleanOptionalAction, default=False)
    a, rest = p.parse_known_args()
    with open(os.path.join(os.environ["FAKE_ARGV_DIR"], "argv.json"), "w") as f:
        json.dump(sys.argv[1:], f)
    mode = os.environ.get("FAKE_MODE", "")
    if mode == "fail":
        print("error: --dataset_name /nope: no such folder", file=sys.stderr)
        sys.exit(2)
    os.makedirs(a.output_dir, exist_ok=True)
    state_path = os.path.join(a.output_dir, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {"step": 0, "parts": []}
    if state["step"]:
        print(f"2026-01-01 00:00:00,000 INFO diffusers_npu.train: resumed from "
              f"{a.output_dir}/checkpoint-{state['step']} at step {state['step']}")
    print("CPU threads: 1 per process (OMP_NUM_THREADS)")
    term = []
    signal.signal(signal.SIGTERM, lambda *_: term.append(1))
    first, step = state["step"], state["step"]
    preempt_at = int(mode.split(":")[1]) if mode.startswith("preempt_at:") else None
    while step < a.max_train_steps:
        if mode == "wait_for_term" and step == first + 1:
            while not term:
                time.sleep(0.01)
        if term or step == preempt_at:
            break
        step += 1
        print(f"step {step}/{a.max_train_steps} step_loss={1.0 / step:.6f} FPS: 100.000 lr=1.000e-04 grad_norm=0.5")
        print("some other log line")
    reason = "preempted" if step < a.max_train_steps else "completed"
    part = {"seconds": 10.0 * (step - first), "first_step": first + 1, "last_step": step, "exit_reason": reason}
    state = {"step": step, "parts": state["parts"] + [part]}
    json.dump(state, open(state_path, "w"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    summary = {"task": "text_to_image", "exit_reason": reason, "steps": step, "max_train_steps": a.max_train_steps,
               "images_per_sec": 100.0, "final_loss": 1.0 / max(step, 1), "e2e_seconds": part["seconds"],
               "e2e_seconds_total": sum(p["seconds"] for p in state["parts"]), "parts": state["parts"],
               "world_size": world, "per_device_batch": a.train_batch_size, "global_batch": a.train_batch_size * world,
               "device": "cpu", "device_name": "cpu", "mixed_precision": "no", "distributed": "ddp"}
    if reason == "preempted":
        print("Pre-empted: checkpoint saved; rerun the same command to continue.")
    elif a.learning_check:
        agreement = 0.12 if mode == "learning_fail" else 0.93
        summary["learning_check"] = {"agreement": agreement, "threshold": 0.9, "passed": agreement >= 0.9}
        print(f"Learning check: {agreement:.1%} of 100 generated digits read as the prompt's digit (...)")
        if agreement < 0.9:
            print(f"Learning check FAILED: {agreement:.1%} < 90.0%")
    tmp = os.path.join(a.output_dir, f"train_summary.json.tmp{os.getpid()}")  # several ranks may write it
    json.dump(summary, open(tmp, "w"))
    os.replace(tmp, os.path.join(a.output_dir, "train_summary.json"))
    sys.exit(4 if summary.get("learning_check", {}).get("passed") is False else 0)
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Path of the fake trainer; the launcher runs it as --script, its argv lands in tmp_path/argv.json."""
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAINER)
    monkeypatch.setenv("FAKE_ARGV_DIR", str(tmp_path))
    monkeypatch.delenv("FAKE_MODE", raising=False)
    return str(path)


@pytest.fixture
def on(monkeypatch):
    """on(kind, count): pretend this node has ``count`` devices of ``kind``."""
    def set_devices(kind, count):
        monkeypatch.setattr(devices, "count_devices", lambda: (kind, count))
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "ASCEND_DEVICE_ID"):
        monkeypatch.delenv(var, raising=False)
    set_devices("cpu", 2)
    return set_devices


def run_launcher(argv, capsys):
    rc = launch.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def line_after(out, prefix):
    return next(l for l in out.splitlines() if l.startswith(prefix))[len(prefix):]


def parse_case_log(path):
    return dict(line.rstrip("\n").split(" = ", 1) for line in open(path))


# ------------------------------------------------------------------------------------------ plans / dry runs

def test_extra_args_values_with_spaces_stay_one_value(tmp_path, on, capsys):
    rc, out, _ = run_launcher(["dreambooth", "--dry_run", f"--log_dir={tmp_path}",
                               "--extra_args=--instance_prompt=\"a photo of sks dog\" --class_prompt 'a dog'",
                               "--", "--validation_prompts", "a red cat", "x"], capsys)
    assert rc == 0
    command = shlex.split(line_after(out, "Launch: "))
    assert command[:2] == [PY, os.path.join(REPO, EXAMPLE["dreambooth"])]
    assert command[-6:] == ["--instance_prompt=a photo of sks dog", "--class_prompt", "a dog",
                            "--validation_prompts", "a red cat", "x"]
    # An unbalanced quote is one clear line, not a half-split command.
    rc, _, err = run_launcher(["dreambooth", "--dry_run", "--extra_args=--instance_prompt=\"a dog"], capsys)
    assert rc == 2 and err.strip() == ("error: --extra_args cannot be split like a shell would (No closing "
                                       "quotation): --instance_prompt=\"a dog")


def test_launch_scripts_pass_quoted_values_and_their_settings_to_the_launcher(tmp_path, on, capsys):
    """Every test/*.sh calls the Python launcher with its settings and the user's options intact (a stub
    $PYTHON records the argv; each argv is then planned in-process)."""
    record = tmp_path / "argv.jsonl"
    stub = tmp_path / "python_stub"
    # The stub records launcher calls; any other use of $PYTHON (env_npu.sh's torch_npu probe) fails, as it
    # does where torch_npu is not installed.
    stub.write_text(f"#!{PY}\nimport json, sys\nif sys.argv[1:3] != ['-m', 'diffusers_npu.launch']:\n"
                    f"    sys.exit(1)\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    scripts = sorted(f for f in os.listdir(os.path.join(REPO, "test")) if f.startswith("train_"))
    assert len(scripts) == 40  # the original port's 15, nine SDXL, nine SD3 and seven FLUX ones
    env = dict(os.environ, PYTHON=str(stub), ASCEND_DEVICE_ID="7")
    # a flag every task takes: the dry run validates the training flags as the run would
    quoted = "--extra_args=--validation_prompt=\"a photo of sks dog\""
    for script in scripts:
        r = subprocess.run(["bash", os.path.join(REPO, "test", script), "--dry_run=1", quoted],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, (script, r.stderr)
    for helper, args in (("downstream_train.sh", ["controlnet", "8"]),
                         ("text_to_image_8p.sh", ["sd1-5", "fp32", "performance"])):
        r = subprocess.run(["bash", os.path.join(REPO, "test", helper), *args, "--dry_run=1", quoted],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 42
    for call, name in zip(calls, scripts + ["train_full_8p_controlnet", "train_performance_8p_text_to_image_sd1-5_fp32"]):
        assert call[:3] == ["-m", "diffusers_npu.launch", f"--log_dir={REPO}/test/output/7"], call
        sdxl_task = "text_to_image_lora_sdxl" if "sdxl_lora" in name else "controlnet_sdxl" \
            if "sdxl_controlnet" in name else "text_to_image_sdxl"
        assert call[-2:] == ["--dry_run=1", quoted]
        assert call[3] == sdxl_task if "sdxl" in name else call[3] in name  # the script's own task
        rc, out, _ = run_launcher(call[2:], capsys)
        assert rc == 0, call
        command = shlex.split(line_after(out, "Launch: "))
        assert "--validation_prompt=a photo of sks dog" in command
        world = 2 if "_8p_" in name else 1           # 8 requested, cut to the 2 pretend CPU devices
        assert f"world={world} " in out and (("On 8 npu devices it would run: ") in out) == (world == 2)
        variant = next((c.split("=", 1)[1] for c in call if c.startswith("--variant=")), None)
        if variant:
            network = launch.get_variant(variant).network
            assert out.startswith(f"Network={network} ")
    assert calls[-2][3:5] == ["controlnet", "--num_devices=8"]
    assert calls[-1][3:5] == ["text_to_image", "--variant=performance_8p_text_to_image_sd1-5_fp32"]
    # Each 8-device text-to-image script names its own row of the table.
    assert sorted(c[4].split("=", 1)[1] for c in calls[:40] if c[4].startswith("--variant=")) == \
        sorted(list(VARIANTS) + list(SD3_VARIANTS))


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "deepspeed2", "deepspeed3"])
def test_8_devices_x_2_nodes_dry_run_prints_the_exact_commands(mode, on, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("PORT", "29600")
    distributed = ["--distributed=deepspeed", f"--zero_stage={mode[-1]}"] if mode.startswith("deep") else \
        [f"--distributed={mode}"]
    argv = ["text_to_image", "--variant=full_8p_text_to_image_sd2-1_fp16", "--dry_run=1", "--model_name=/m/sd21",
            f"--log_dir={tmp_path}", "--output_dir=/shared/sd21", *distributed]
    flags = ["--pretrained_model_name_or_path=/m/sd21", "--dataset_name=lambdalabs/pokemon-blip-captions",
             "--resolution=768", "--train_batch_size=4", "--mixed_precision=fp16", "--center_crop", "--random_flip",
             "--lr_scheduler=constant", "--lr_warmup_steps=0", "--learning_rate=1e-05", "--max_grad_norm=1",
             "--dataloader_num_workers=8", "--enable_pin_memory", "--enable_persistent_workers",
             "--attention=upcast", "--max_train_steps=15000", "--checkpointing_steps=5000",
             "--output_dir=/shared/sd21", *distributed, "--resume_from_checkpoint=latest", "--disable_progress_bar"]
    if mode == "deepspeed2":  # stage 2 is said explicitly even when only --distributed=deepspeed is given
        argv.remove("--zero_stage=2")
        flags.remove("--zero_stage=2")
        flags.append("--zero_stage=2")

    def torchrun(nproc):
        return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "2", "--node_rank",
                "1", "--master_addr", "10.0.0.1", "--master_port", "29600",
                os.path.join(REPO, EXAMPLE["text_to_image"]), *flags]

    # On an 8-device NPU node: exactly one command, for 16 processes in all, with torchrun's pre-emption window
    # widened from 30 s.
    on("npu", 8)
    rc, out, _ = run_launcher(argv, capsys)
    assert rc == 0
    assert out.splitlines()[0] == ("Network=StableDiffusion_sd2-1_text_to_image_fp16 devices/node=8 nodes=2 "
                                   "world=16 device=npu")
    assert shlex.split(line_after(out, "Launch: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 ")) == torchrun(8)
    assert "it would run" not in out
    if mode.startswith("deepspeed"):
        from diffusers_npu.train.engine import deepspeed_config

        text = out.split(f"DeepSpeed config (ZeRO-{mode[-1]}), as the trainer builds it", 1)[1]
        config = json.loads(text.split(":\n", 1)[1].split("\nLog: ", 1)[0])
        assert config == deepspeed_config(zero_stage=int(mode[-1]), mixed_precision="fp16", train_batch_size=4,
                                          gradient_accumulation_steps=1, max_grad_norm=1.0)
        assert config["zero_optimization"]["stage"] == int(mode[-1]) and config["fp16"]["enabled"] is True
    else:
        assert "DeepSpeed" not in out

    # On a 2-core CPU box: what really runs there (2 processes, gloo), then the requested command.
    on("cpu", 2)
    rc, out, _ = run_launcher(argv, capsys)
    assert rc == 0
    assert "Note: 8 devices requested, 2 usable CPU cores on this node; using 2." in out
    env = "ACCELERATE_USE_CPU=true TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 "
    assert shlex.split(line_after(out, "Launch: " + env)) == torchrun(2)
    assert shlex.split(line_after(out, "On 8 npu devices x 2 nodes it would run: TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 ")) \
        == torchrun(8)
    assert ("DeepSpeed config" in out) == mode.startswith("deepspeed")

    # Several nodes write into ONE folder: the default under --log_dir is node-local, so it is refused.
    rc, out, err = run_launcher([a for a in argv if not a.startswith("--output_dir")], capsys)
    assert rc == 2 and err.strip() == (
        "error: --output_dir is required with several nodes (nodes=2): give a folder on a filesystem every node "
        f"mounts at the same path (NFS, Lustre, ...); the default {tmp_path}/StableDiffusion_sd2-1_text_to_image_fp16 "
        "is on this node's own disk")


def test_cli_subcommand_passes_flags_after_double_dash(on, capsys, tmp_path):
    rc = cli.main(["launch", "text-to-image", "--dry_run", f"--log_dir={tmp_path}", "--learning_check=0",
                   "--", "--use_ema", "--validation_prompts", "a b"])
    out = capsys.readouterr().out
    assert rc == 0
    command = shlex.split(line_after(out, "Launch: "))
    assert command == [PY, os.path.join(REPO, EXAMPLE["text_to_image"]),
                       f"--config={REPO}/examples/text_to_image/configs/embedded_digits.yaml",
                       f"--output_dir={tmp_path}/StableDiffusion_text_to_image", "--no-learning_check",
                       "--resume_from_checkpoint=latest", "--disable_progress_bar", "--use_ema",
                       "--validation_prompts", "a b"]
    # The main job (embedded model, embedded data) asks for the learning check; with another data set it is
    # switched off explicitly, since the embedded config file would switch it on.
    rc = cli.main(["launch", "text_to_image", "--dry_run", f"--log_dir={tmp_path}"])
    assert rc == 0 and "--learning_check" in shlex.split(line_after(capsys.readouterr().out, "Launch: "))
    rc = cli.main(["launch", "text_to_image", "--dry_run", f"--log_dir={tmp_path}", "--dataset_name=/d"])
    command = shlex.split(line_after(capsys.readouterr().out, "Launch: "))
    assert rc == 0 and "--no-learning_check" in command and "--learning_check" not in command


def test_unknown_option_and_bad_values_are_one_line(on, capsys):
    rc = cli.main(["launch", "text_to_image", "--batch_sise=4"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("error: unrecognized arguments: --batch_sise=4 (did you mean --batch_size?) "
                               "(see diffusers-npu launch --help)\n")
    rc, _, err = run_launcher(["text_to_image", "--num_devices=two"], capsys)
    assert rc == 2 and "argument --num_devices/--nproc: expected an integer >= 1, got 'two'" in err
    rc, _, err = run_launcher(["text_to_image", "--dry_run", "--distributed=fsdp", "--zero_stage=3"], capsys)
    assert rc == 2 and err.strip() == ("error: --zero_stage=3 applies to --distributed=deepspeed only "
                                       "(got --distributed=fsdp)")
    rc, _, err = run_launcher(["text_to_imag", "--dry_run"], capsys)
    assert rc == 2 and "unknown training task 'text_to_imag' (did you mean 'text_to_image'?)" in err


@pytest.mark.parametrize("where", ["cuda_raises", "npu_missing", "zero"])
def test_device_count_errors_are_reported_not_turned_into_one(where, monkeypatch, capsys):
    import torch

    from diffusers_npu import device

    if where == "cuda_raises":
        monkeypatch.setattr(device, "detect_device", lambda override=None: "cuda")

        def broken():
            raise RuntimeError("CUDA driver initialization failed")
        monkeypatch.setattr(torch.cuda, "device_count", broken)
        expected = ("error: cannot count the cuda devices on this node: RuntimeError: CUDA driver initialization "
                    "failed (check the driver with npu-smi / nvidia-smi)")
    elif where == "npu_missing":
        monkeypatch.setenv("DIFFUSERS_NPU_DEVICE", "npu")
        expected = "error: cannot choose the device to launch on: Device 'npu' was requested via the"
    else:
        monkeypatch.setattr(device, "detect_device", lambda override=None: "cuda")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        expected = ("error: the cuda runtime reports 0 devices on this node; check ASCEND_RT_VISIBLE_DEVICES / "
                    "CUDA_VISIBLE_DEVICES and the driver")
    rc, out, err = run_launcher(["text_to_image", "--dry_run"], capsys)
    assert rc == 2 and err.startswith(expected) and len(err.splitlines()) == 1
    assert "Launch:" not in out


def test_module_entry_point_and_every_option_has_help():
    r = subprocess.run([PY, "-m", "diffusers_npu.launch", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m diffusers_npu.launch ")
    parser = ArgumentParser(prog="x")
    launch.configure_parser(parser)
    missing = [a.dest for a in parser._actions if not a.help]
    assert missing == [] and "--extra_args" in r.stdout and "--variant NAME" in r.stdout


def test_cpu_devices_are_the_usable_cores():
    assert devices.count_devices() == ("cpu", len(os.sched_getaffinity(0)))


# ------------------------------------------------------------------------------------------ result lines

def test_training_time_is_ms_per_step_of_the_global_batch_for_1_and_8_devices():
    one = {"images_per_sec": 80.0, "final_loss": 0.25, "e2e_seconds": 120.4, "world_size": 1,
           "per_device_batch": 4, "global_batch": 4, "device": "npu"}
    eight = dict(one, images_per_sec=640.0, world_size=8, global_batch=32)
    # 8 devices with 2 accumulation steps, an older summary without global_batch: 4 x 8 x 2 = 64 images a step.
    accum = dict(one, images_per_sec=640.0, world_size=8, global_batch=None, config={"gradient_accumulation_steps": 2})
    assert report.training_time_ms(one) == pytest.approx(50.0)      # 4 images at 80/s = 50 ms
    assert report.training_time_ms(eight) == pytest.approx(50.0)    # 32 images at 640/s = 50 ms (not 6.25)
    assert report.training_time_ms(accum) == pytest.approx(100.0)   # 64 images at 640/s
    entries = dict(report.case_entries(eight, "StableDiffusion_x", "acc"))
    assert list(entries) == CASE_KEYS
    assert entries == {"Network": "StableDiffusion_x", "RankSize": 8, "BatchSize": 4, "DeviceType": "npu",
                       "CaseName": "StableDiffusion_x_bs4_8p_acc", "ActualFPS": "640.000", "TrainingTime": "50.00",
                       "ActualLoss": "0.250000", "E2ETrainingTime": "120"}
    assert dict(report.case_entries(one, "N", "perf"))["CaseName"] == "N_bs4_1p_perf"
    assert report.training_time_ms(dict(one, images_per_sec=0)) != report.training_time_ms(dict(one, images_per_sec=0))


def test_e2e_line_gives_the_total_and_this_run_after_a_resume():
    first = {"images_per_sec": 1.5, "final_loss": 0.5, "e2e_seconds": 300.2, "e2e_seconds_total": 300.2,
             "parts": [{"seconds": 300.2}]}
    assert report.result_lines(first) == ["------------------ Final result ------------------",
                                          "Final Performance images/sec : 1.500", "Final Train Loss : 0.500000",
                                          "E2E Training Duration sec : 300"]
    resumed = dict(first, e2e_seconds=934.0, e2e_seconds_total=1234.2, parts=[{}, {}])
    assert report.result_lines(resumed)[-1] == "E2E Training Duration sec : 1234 (this run 934)"


def test_progress_line_is_rewritten_in_place_on_a_terminal():
    stream, clock = io.StringIO(), iter(range(0, 1000, 2)).__next__
    p = Progress(stream, tty=True, clock=lambda: float(clock()))
    for step in range(11, 21):  # a resumed run: 10 steps left at one step per 2 s
        p.step(StepLine(step, 20, 0.5, 64.0))
        if step == 15:
            text = stream.getvalue().rsplit("\r", 1)[1]
            assert text.startswith("step 15/20 (75%)  loss 0.5000  64.0 images/s  ETA 0:10")
    p.message("Learning check: ...")
    out = stream.getvalue()
    assert out.count("\r") == 10 and out.count("\n") == 2
    assert re.search(r"step 20/20 \(100%\)  loss 0.5000  64.0 images/s  done *\nLearning check: \.\.\.\n$", out)


def test_progress_lines_are_throttled_when_not_a_terminal():
    stream, now = io.StringIO(), [0.0]
    p = Progress(stream, tty=False, clock=lambda: now[0])
    for step in range(1, 1001):
        now[0] = step * 0.01 if step < 500 else 5 + (step - 500) * 1.0   # slows down in the second half
        p.step(StepLine(step, 1000, 0.1, 10.0))
    lines = stream.getvalue().splitlines()
    steps = [int(re.match(r"step (\d+)/1000", l).group(1)) for l in lines]
    assert steps[0] == 1 and steps[-1] == 1000
    assert steps[:6] == [1, 100, 200, 300, 400, 500]       # every 10% while fast
    assert steps[6:9] == [530, 560, 590]                    # every 30 s while slow
    assert len(lines) < 30


# ------------------------------------------------------------------------------------------ runs (fake trainer)

def test_progress_reaches_stdout_and_the_log_has_every_step(fake, tmp_path, on, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = run_launcher(["text_to_image", f"--script={fake}", f"--log_dir={tmp_path}/logs",
                                 f"--output_dir={out_dir}", "--max_train_steps=40", "--num_devices=1"], capsys)
    assert rc == 0, out + err
    log_path = tmp_path / "logs" / "train_0.log"
    assert out.splitlines()[1] == f"Log: {log_path} (the full output; a rerun appends to it)"
    progress = [l for l in out.splitlines() if l.startswith("step ")]
    assert progress[0].startswith("step 1/40 (2%)  loss 1.0000  100.0 images/s")
    assert progress[-1] == "step 40/40 (100%)  loss 0.0250  100.0 images/s  done"
    assert 3 <= len(progress) <= 12 and "CPU threads: 1 per process (OMP_NUM_THREADS)" in out
    log = log_path.read_text()
    assert [int(n) for n in re.findall(r"^step (\d+)/40 step_loss=", log, re.M)] == list(range(1, 41))
    assert log.count("some other log line") == 40
    # The learning check was asked for (main job); its line follows the result lines.
    lines = out.splitlines()
    i = lines.index("------------------ Final result ------------------")
    assert lines[i + 1:i + 6] == ["Final Performance images/sec : 100.000", "Final Train Loss : 0.025000",
                                  "E2E Training Duration sec : 400",
                                  "Learning check: 93.0% of 100 generated digits read as the prompt's digit (...)",
                                  f"Summary: {tmp_path}/logs/StableDiffusion_text_to_image_bs4_1p_acc.log"]
    case = parse_case_log(tmp_path / "logs" / "StableDiffusion_text_to_image_bs4_1p_acc.log")
    assert list(case) == CASE_KEYS and case["TrainingTime"] == "40.00" and case["E2ETrainingTime"] == "400"


def test_live_line_on_a_terminal(fake, tmp_path, on, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    screen = Tty()
    monkeypatch.setattr(sys, "stdout", screen)
    rc = launch.main(["text_to_image", f"--script={fake}", f"--log_dir={tmp_path}", f"--output_dir={tmp_path}/o",
                      "--max_train_steps=20", "--learning_check=0"])
    assert rc == 0
    lines = screen.getvalue().split("\n")
    line = next(l for l in lines if l.startswith("\rstep 1/20"))  # one terminal line, redrawn 20 times
    assert line.count("\r") == 20 and line.rstrip().endswith("step 20/20 (100%)  loss 0.0500  100.0 images/s  done")
    assert not any(l.startswith("step ") for l in lines)


def test_rerun_appends_to_the_log_and_reports_total_and_part(fake, tmp_path, on, capsys, monkeypatch):
    argv = ["text_to_image", f"--script={fake}", f"--log_dir={tmp_path}", f"--output_dir={tmp_path}/o",
            "--max_train_steps=6", "--learning_check=0"]
    monkeypatch.setenv("FAKE_MODE", "preempt_at:4")
    rc, out, _ = run_launcher(argv, capsys)
    assert rc == 0
    assert out.splitlines()[-1] == (f"Pre-empted at step 4 of 6: a checkpoint was saved. Rerun the same command "
                                    f"to continue (the log is appended to: {tmp_path}/train_0.log).")
    assert "Final result" not in out and not list(tmp_path.glob("StableDiffusion_*.log"))
    first_part = (tmp_path / "train_0.log").read_text()
    monkeypatch.setenv("FAKE_MODE", "")
    rc, out, _ = run_launcher(argv, capsys)
    assert rc == 0 and "Resumed from " + f"{tmp_path}/o/checkpoint-4 at step 4" in out
    assert "E2E Training Duration sec : 60 (this run 20)" in out.splitlines()
    log = (tmp_path / "train_0.log").read_text()
    assert log.startswith(first_part)  # the first part is kept as it was
    markers = re.findall(r"^==== diffusers-npu launch: part (\d) of this log", log, re.M)
    assert markers == ["1", "2"]
    assert [int(n) for n in re.findall(r"^step (\d+)/6 ", log, re.M)] == [1, 2, 3, 4, 5, 6]
    assert parse_case_log(tmp_path / "StableDiffusion_text_to_image_bs4_1p_acc.log")["E2ETrainingTime"] == "60"


def test_sigterm_to_the_launcher_preempts_the_trainer_and_exits_0(fake, tmp_path, on, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "wait_for_term")
    log = tmp_path / "train_0.log"

    def send_term_when_training():
        deadline = time.time() + 60
        while time.time() < deadline:
            handler = signal.getsignal(signal.SIGTERM)
            if getattr(handler, "__name__", "") == "forward" and log.exists() and "step 1/6" in log.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)
    sender = threading.Thread(target=send_term_when_training)
    sender.start()
    rc, out, _ = run_launcher(["text_to_image", f"--script={fake}", f"--log_dir={tmp_path}",
                               f"--output_dir={tmp_path}/o", "--max_train_steps=6", "--learning_check=0"], capsys)
    sender.join()
    assert rc == 0 and "Pre-empted at step 1 of 6: a checkpoint was saved." in out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the launcher's handler is gone again


def test_learning_check_below_threshold_exits_4_after_the_result_lines(fake, tmp_path, on, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "learning_fail")
    rc, out, err = run_launcher(["text_to_image", f"--script={fake}", f"--log_dir={tmp_path}",
                                 f"--output_dir={tmp_path}/o", "--max_train_steps=3"], capsys)
    assert rc == 4
    assert "Final Train Loss : 0.333333" in out and "Learning check: 12.0% of 100 generated digits" in out
    assert err.strip() == ("Learning check FAILED: 12.0% of the generated digits read as the prompt's digit, "
                           "below the threshold 90.0% (--learning_check_min); see learning_check.png in the "
                           "output folder")
    assert (tmp_path / "StableDiffusion_text_to_image_bs4_1p_acc.log").exists()
    assert "Learning check FAILED: 12.0% of the generated digits" in (tmp_path / "train_0.log").read_text()


def test_performance_variant_writes_a_perf_case_name(fake, tmp_path, on, capsys):
    rc, out, _ = run_launcher(["text_to_image", "--variant=performance_8p_text_to_image_sd1-5_fp32",
                               f"--script={fake}", f"--log_dir={tmp_path}", f"--output_dir={tmp_path}/o",
                               "--num_devices=1", "--max_train_steps=2"], capsys)
    assert rc == 0
    case = parse_case_log(tmp_path / "StableDiffusion_sd1-5_text_to_image_fp32_bs4_1p_perf.log")
    assert case["CaseName"] == "StableDiffusion_sd1-5_text_to_image_fp32_bs4_1p_perf"
    assert case["TrainingTime"] == "40.00"  # 4 images at 100 images/s
    argv = json.load(open(tmp_path / "argv.json"))
    assert "--mixed_precision=no" in argv and "--report_to=none" in argv and "--max_train_steps=2" in argv


def test_training_failure_exits_with_its_code_and_shows_the_log_tail(fake, tmp_path, on, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "fail")
    rc, out, err = run_launcher(["text_to_image", f"--script={fake}", f"--log_dir={tmp_path}",
                                 f"--output_dir={tmp_path}/o"], capsys)
    assert rc == 2
    assert err.splitlines()[0] == f"Training failed (exit code 2). Last lines of {tmp_path}/train_0.log:"
    assert "  error: --dataset_name /nope: no such folder" in err.splitlines()
    assert "error: --dataset_name /nope: no such folder" in out  # relayed as it happened
    assert not list(tmp_path.glob("StableDiffusion_*.log"))


# ------------------------------------------------------------------------------------------ runs (real trainer)

def test_1p_embedded_run_writes_the_result_lines_from_the_real_summary(tmp_path, on, capsys, embedded_paths,
                                                                       monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc, out, err = run_launcher(["text_to_image", f"--log_dir={tmp_path}", f"--output_dir={tmp_path}/o",
                                 "--batch_size=8", "--max_train_steps=3", "--learning_check=0", "--",
                                 "--report_to=none"], capsys)
    assert rc == 0, out + err
    summary = json.load(open(tmp_path / "o" / "train_summary.json"))
    case = parse_case_log(tmp_path / "StableDiffusion_text_to_image_bs8_1p_acc.log")
    assert case["RankSize"] == "1" and case["DeviceType"] == "cpu"
    assert float(case["ActualFPS"]) == pytest.approx(summary["images_per_sec"], abs=1e-3)
    assert float(case["TrainingTime"]) == pytest.approx(8000 / summary["images_per_sec"], rel=1e-3)
    assert f"Final Train Loss : {summary['final_loss']:.6f}" in out.splitlines()
    assert [l.split()[1] for l in out.splitlines() if l.startswith("step ")] == ["1/3", "2/3", "3/3"]
    log = (tmp_path / "train_0.log").read_text()
    assert re.findall(r"^step (\d)/3 step_loss=[0-9.]+ FPS: [0-9.]+", log, re.M) == ["1", "2", "3"]


@pytest.mark.slow
def test_two_process_cpu_run_of_the_embedded_model(tmp_path, capsys, embedded_paths, monkeypatch):
    """--num_devices=2 on CPU really runs two processes (torchrun, gloo) and reports them as 2p."""
    if devices.usable_cpu_cores() < 2:
        pytest.skip("needs 2 usable CPU cores")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "PORT", "ASCEND_DEVICE_ID"):
        monkeypatch.delenv(var, raising=False)
    rc, out, err = run_launcher(["text_to_image", "--num_devices=2", f"--log_dir={tmp_path}",
                                 f"--output_dir={tmp_path}/o", "--batch_size=2", "--max_train_steps=3",
                                 "--learning_check=0", "--", "--report_to=none", "--checkpointing_steps=100"],
                                capsys)
    assert rc == 0, out + err[-3000:]
    assert "ACCELERATE_USE_CPU=true" in line_after(out, "Launch: ")
    summary = json.load(open(tmp_path / "o" / "train_summary.json"))
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
    case = parse_case_log(tmp_path / "StableDiffusion_text_to_image_bs2_2p_acc.log")
    assert case["RankSize"] == "2"
    assert float(case["TrainingTime"]) == pytest.approx(4000 / summary["images_per_sec"], rel=1e-3)


@pytest.mark.slow
def test_main_job_learns_and_the_check_fails_below_its_threshold(tmp_path, embedded_paths):
    """The README's main job through its own script, on a shorter schedule that still proves learning: 200 of
    its 600 steps (the full run reaches 100%, see README; 200 steps read 36%, 300 already 100%). The generated
    digits must match their prompts far above chance (10%), the check's picture and per-digit figures must be
    written, and -- with the threshold at its default 90%, above what 200 steps reach -- the launcher must exit 4
    after its result lines with a line giving the figure and the threshold."""
    device_id = f"pytest-main-{os.getpid()}"
    # Both cores for the suite's longest run: the trainer's own choice, as the README's command makes it.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["ASCEND_DEVICE_ID"] = device_id
    out = tmp_path / "digits"
    try:
        r = subprocess.run(["bash", os.path.join(REPO, "test", "train_full_1p_text_to_image.sh"),
                            f"--output_dir={out}", "--max_train_steps=200",
                            "--extra_args=--lr_warmup_steps 20 --checkpointing_steps 1000"],
                           capture_output=True, text=True, timeout=3000, env=env, cwd=REPO)
        case = parse_case_log(os.path.join(REPO, "test", "output", device_id,
                                           "StableDiffusion_text_to_image_bs64_1p_acc.log"))
    finally:
        import shutil
        shutil.rmtree(os.path.join(REPO, "test", "output", device_id), ignore_errors=True)
    summary = json.load(open(out / "train_summary.json"))
    check = summary["learning_check"]
    print("learning check:", json.dumps(check), "e2e:", summary.get("e2e_seconds"))
    assert check["agreement"] >= 0.18, check  # 100 samples: p < 0.01 by chance alone (binomial, p=0.1)
    assert set(check["per_digit"]) == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert (out / "learning_check.png").exists() and check["grid"] == "learning_check.png"
    assert check["agreement"] < 0.9 and not check["passed"]
    assert r.returncode == 4, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Final Performance images/sec :" in r.stdout  # the result lines come first
    assert re.search(r"^Learning check: [0-9.]+% of 100", r.stdout, re.M)
    # guidance 1 (the conditional model alone) is reported beside the default guidance
    assert set(check["guidance_1"]["per_digit"]) == set(check["per_digit"]) and check["guidance_scale"] == 7.5
    assert re.search(r"^Learning check at guidance 1 \(no classifier-free guidance\): [0-9.]+% of 100", r.stdout,
                     re.M)
    assert re.search(r"Learning check FAILED: [0-9.]+% .*below the (required|threshold) 90\.0%", r.stdout + r.stderr)
    assert float(case["ActualFPS"]) == pytest.approx(summary["images_per_sec"], abs=1e-3)


def test_sdxl_full_fine_tuning_on_8_devices_x_2_nodes_is_sharded_by_default(on, capsys, monkeypatch):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("PORT", "29600")
    rc, out, _ = run_launcher(["text_to_image_sdxl", "--num_devices=8", "--model_name=/models/sdxl",
                               "--dataset_name=/data/pokemon", "--mixed_precision=fp16", "--dry_run",
                               "--output_dir=/shared/sdxl"], capsys)
    assert rc == 0
    command = shlex.split(line_after(out, "On 8 npu devices x 2 nodes it would run: "))
    assert command[command.index("--nproc_per_node") + 1] == "8" and "--nnodes" in command
    assert "--distributed=fsdp" in command and "--resolution=1024" in command and "--train_batch_size=24" in command
    rc, out, _ = run_launcher(["text_to_image_lora_sdxl", "--num_devices=8", "--model_name=/models/sdxl", "--dry_run",
                               "--output_dir=/shared/lora"], capsys)
    assert rc == 0 and "--distributed=ddp" in shlex.split(line_after(out, "Launch: "))


def test_sd3_full_fine_tuning_on_8_devices_x_2_nodes_is_sharded_by_default_and_lora_is_ddp(on, capsys, monkeypatch):
    for k, v in (("NNODES", "2"), ("NODE_RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("PORT", "29600")):
        monkeypatch.setenv(k, v)
    rc, out, _ = run_launcher(["dreambooth_sd3", "--num_devices=8", "--model_name=/models/sd3-medium",
                               "--extra_args=--instance_data_dir=/data/dog", "--output_dir=/shared/sd3", "--dry_run"], capsys)
    assert rc == 0
    command = shlex.split(line_after(out, "On 8 npu devices x 2 nodes it would run: "))
    assert command[command.index("--nproc_per_node") + 1] == "8" and command[command.index("--node_rank") + 1] == "1"
    assert "--distributed=fsdp" in command and "--resolution=1024" in command and "--train_batch_size=4" in command
    assert "--gradient_checkpointing" in command and "--mixed_precision=bf16" in command
    assert command[-1].endswith("train_dreambooth_sd3.py") or "examples/dreambooth/train_dreambooth_sd3.py" in out
    for task in ("dreambooth_lora_sd3", "controlnet_sd3"):
        rc, out, _ = run_launcher([task, "--num_devices=8", "--model_name=/models/sd3-medium", "--output_dir=/shared/sd3", "--dry_run"], capsys)
        assert rc == 0 and "--distributed=ddp" in shlex.split(line_after(out, "Launch: "))
    rc, out, _ = run_launcher(["dreambooth_sd3", "--variant=performance_8p_dreambooth_sd3", "--output_dir=/shared/sd3", "--dry_run"], capsys)
    assert rc == 0 and "--max_train_steps=1000" in out and "--report_to=none" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_full_1p_text_to_image_sdxl.sh", "train_full_1p_text_to_image_sdxl_bf16.sh",
                                    "train_full_1p_text_to_image_sdxl_fp16.sh", "train_full_1p_sdxl_lora.sh",
                                    "train_full_1p_sdxl_controlnet.sh"])
def test_one_device_sdxl_launchers_run_to_the_result_lines(script, tmp_path):
    device_id = f"pytest-sdxl-{os.getpid()}"
    env = dict(os.environ, ASCEND_DEVICE_ID=device_id, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(["bash", os.path.join(REPO, "test", script), f"--output_dir={tmp_path / 'o'}",
                            "--max_train_steps=2", "--learning_check=0", "--batch_size=4"],
                           capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    finally:
        import shutil
        shutil.rmtree(os.path.join(REPO, "test", "output", device_id), ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "------------------ Final result ------------------" in r.stdout
    assert re.search(r"^Final Performance images/sec : [0-9.]+$", r.stdout, re.M)
    assert json.load(open(tmp_path / "o" / "train_summary.json"))["steps"] == 2
