"""Reliability promises (issue #6): exact resume, crash-safe checkpoints, pre-emption, non-finite losses,
named bad input, and a real 2-process run."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusers_npu import checkpoint as ckpt
from diffusers_npu.train import main, run
from diffusers_npu.train.tasks.text_to_image import TextToImageTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "text_to_image", "train_text_to_image.py")
QUIET = ["--report_to", "none", "--disable_progress_bar", "--no-learning_check"]


def argv(out, steps, *extra, batch=4):
    return ["--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            *QUIET, *map(str, extra)]


def weights(folder, name="unet/diffusion_pytorch_model.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, name))


# ------------------------------------------------------------------------------------------ 1. exact resume

@pytest.mark.parametrize("mode", [
    ["--random_flip", "--use_ema", "--ema_decay", "0.9", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
     "--dataloader_num_workers", "1", "--max_train_samples", "20"],   # 20 samples / batch 4 -> epoch ends at 5
    ["--cache_latents", "--random_flip", "--mixed_precision", "fp16", "--gradient_accumulation_steps", "2",
     "--max_train_samples", "24"],
], ids=["online-ema-workers-epochs", "cached-fp16-accum"])
def test_resume_is_bit_identical(tmp_path, mode, monkeypatch):
    straight = tmp_path / "straight"
    run(TextToImageTask, argv(straight, 7, *mode))
    split = tmp_path / "split"
    # The same 7-step run, interrupted by a real SIGTERM after step 3 (mid-epoch), then rerun with 'latest'.
    calls = {"n": 0}

    def interrupt_after_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(TextToImageTask, "after_optimizer_step", interrupt_after_3)
        first = run(TextToImageTask, argv(split, 7, *mode, "--resume_from_checkpoint", "latest"))
    assert first["exit_reason"] == "preempted" and first["steps"] == 3
    run(TextToImageTask, argv(split, 7, *mode, "--resume_from_checkpoint", "latest"))
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The loss history is identical too (same data order, same noise).
    ha = json.load(open(straight / "train_summary.json"))
    hb = json.load(open(split / "train_summary.json"))
    assert ha["final_loss"] == hb["final_loss"]


def test_data_order_resumes_mid_epoch_without_repeats():
    from diffusers_npu.data.dataset import ResumableSampler

    s = ResumableSampler(10, 3, seed=1)  # 3 batches per epoch, 1 sample dropped per epoch
    it = iter(s)
    full = [next(it) for _ in range(3 * 7)]
    s2 = ResumableSampler(10, 3, seed=1, start_position=4)
    it2 = iter(s2)
    assert [next(it2) for _ in range(9)] == full[12:21]
    epoch0 = [i for e, i in full[:9]]
    assert len(set(epoch0)) == 9  # no sample twice within an epoch
    # Two ranks split each global batch and together see exactly the 1-rank order.
    r0, r1 = iter(ResumableSampler(10, 3, 1, world_size=2, rank=0)), iter(ResumableSampler(10, 3, 1, 2, 1))
    one = iter(ResumableSampler(10, 6, 1))
    assert [next(r0) for _ in range(3)] + [next(r1) for _ in range(3)] == [next(one) for _ in range(6)]


# ------------------------------------------------------------------------------ 2. crash-safe checkpoints

def _all_visible_checkpoints_good(out):
    for step, path in ckpt.list_checkpoints(str(out), complete_only=False):
        assert ckpt.is_complete(path), f"{path} visible without COMPLETE marker"
        weights(path, "unet.safetensors")
        json.load(open(os.path.join(path, "train_state.json")))
        torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)


def test_kill_9_during_saves_never_leaves_a_bad_checkpoint(tmp_path, embedded_paths):
    out = tmp_path / "o"
    cmd = [sys.executable, SCRIPT, *argv(out, 200, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                                         "--resume_from_checkpoint", "latest")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    kills = 0
    for delay in (0.05, 0.13, 0.21, 0.3, 0.42):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # Wait for training to be under way (checkpoints are written every step), then kill at an odd moment.
        for line in p.stdout:
            if "saved checkpoint" in line:
                break
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        _all_visible_checkpoints_good(out)
        latest = ckpt.resolve_resume("latest", str(out))
        assert latest is not None and ckpt.is_complete(latest)
        assert len(ckpt.list_checkpoints(str(out))) >= 1  # pruning never removed the only good one
    assert kills == 5
    # And the run still resumes from what is there.
    res = run(TextToImageTask, argv(out, ckpt.list_checkpoints(str(out))[-1][0] + 1, "--resume_from_checkpoint",
                                     "latest"))
    assert res["exit_reason"] == "completed"


def test_partial_checkpoint_is_ignored_and_explicit_resume_refused(tmp_path):
    out = tmp_path / "o"
    run(TextToImageTask, argv(out, 2, "--checkpointing_steps", "2"))
    # A save killed half-way: a temp folder, and a checkpoint folder without its marker.
    os.makedirs(out / ".tmp-checkpoint-3")
    os.makedirs(out / "checkpoint-4")
    (out / "checkpoint-4" / "unet.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_resume("latest", str(out)).endswith("checkpoint-2")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_resume(str(out / "checkpoint-4"), str(out))
    assert ckpt.prune(str(out), 1) == []  # the only good checkpoint is never pruned


def test_final_pipeline_is_replaced_atomically(tmp_path):
    from diffusers_npu.train.loop import install_folder_contents

    dst = tmp_path / "out"
    src = tmp_path / "new"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w").write_text("new")
    (src / "model_index.json").write_text("{}")
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "w").write_text("old")
    (dst / "model_index.json").write_text("old")
    order = []
    real = os.replace

    def spy(a, b):
        order.append(os.path.basename(b))
        return real(a, b)

    import diffusers_npu.train.loop as loop

    loop.os.replace = spy
    try:
        install_folder_contents(str(src), str(dst))
    finally:
        loop.os.replace = real
    assert order[-1] == "model_index.json"  # the loader's entry point appears last
    assert (dst / "unet" / "w").read_text() == "new" and (dst / "model_index.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------ 3. pre-emption

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_zero_then_rerun_continues(tmp_path, sig, embedded_paths):
    out = tmp_path / "o"
    cmd = [sys.executable, SCRIPT, *argv(out, 40, "--checkpointing_steps", "1000", "--resume_from_checkpoint",
                                         "latest")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 3/40"):
            break
    t0 = time.time()
    p.send_signal(sig)
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == 0, rest[-2000:]
    assert time.time() - t0 < 60
    assert "Pre-empted" in rest
    ckpts = ckpt.list_checkpoints(str(out))
    assert len(ckpts) == 1 and 3 <= ckpts[0][0] < 40
    stopped = ckpts[0][0]
    assert not os.path.exists(out / "model_index.json")  # no final pipeline from an interrupted run
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step {stopped + 1}/40" in r.stdout and f"step {stopped}/40" not in r.stdout
    assert os.path.exists(out / "model_index.json")


# --------------------------------------------------------------------------------------- 4. non-finite loss

def _nan_at(step_to_break, value=float("nan")):
    real = TextToImageTask.compute_loss
    calls = {"n": 0}

    def compute_loss(self, batch, generator=None):
        loss, extras = real(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == step_to_break:
            loss = loss * value
        return loss, extras

    return compute_loss


def test_nan_loss_fp32_stops_naming_the_step_and_saves_nothing_corrupt(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(TextToImageTask, "compute_loss", _nan_at(3))
    out = tmp_path / "o"
    rc = main(TextToImageTask, argv(out, 6, "--checkpointing_steps", "2", "--log_every", "5"))
    err = capsys.readouterr().err
    assert rc == 3 and "step 3: the loss is nan" in err
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2]  # checkpoint-2 intact, nothing after step 2
    assert not os.path.exists(out / "model_index.json")
    w = weights(out / "checkpoint-2", "unet.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_nan_loss_skipped_with_max_bad_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(TextToImageTask, "compute_loss", _nan_at(2))
    s = run(TextToImageTask, argv(tmp_path / "o", 4, "--max_bad_steps", "1"))
    assert s["bad_steps_skipped"] == 1 and s["steps"] == 4 and np.isfinite(s["final_loss"])
    w = weights(tmp_path / "o")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_fp16_overflow_skips_the_step_and_counts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(TextToImageTask, "compute_loss", _nan_at(2, value=float("inf")))
    s = run(TextToImageTask, argv(tmp_path / "o", 4, "--mixed_precision", "fp16"))
    assert s["overflow_steps_skipped"] >= 1 and s["steps"] == 4
    w = weights(tmp_path / "o")
    assert all(torch.isfinite(v).all() for v in w.values())


# ----------------------------------------------------------------------------------------- 5. bad input

def _script(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *QUIET, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_empty_dataset_and_batch_larger_than_dataset(tmp_path, embedded_paths):
    from datasets import load_dataset

    ds = load_dataset(embedded_paths["dataset"], split="train")
    ds.select([]).save_to_disk(str(tmp_path / "empty"))
    r = _script("--local_data_dir", tmp_path / "empty", "--output_dir", tmp_path / "o1")
    assert r.returncode == 2 and "empty" in r.stderr
    ds.select(range(5)).save_to_disk(str(tmp_path / "five"))
    r = _script("--local_data_dir", tmp_path / "five", "--train_batch_size", 8, "--output_dir", tmp_path / "o2")
    assert r.returncode == 2 and "--train_batch_size" in r.stderr and "(5 samples)" in r.stderr
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")


def test_unreadable_caption_is_named(tmp_path, embedded_paths):
    from datasets import load_dataset

    ds = load_dataset(embedded_paths["dataset"], split="train").select(range(8))
    ds = ds.map(lambda r, i: {"text": [] if i == 2 else [r["text"]]}, with_indices=True)
    ds.save_to_disk(str(tmp_path / "d"))
    r = _script("--local_data_dir", tmp_path / "d", "--train_batch_size", 8, "--output_dir", tmp_path / "o",
                "--max_train_steps", 1)
    assert r.returncode == 2 and "caption row 2" in r.stderr and "empty list" in r.stderr


def test_missing_component_and_unwritable_output(tmp_path, embedded_paths):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(embedded_paths["model"], model)
    shutil.rmtree(model / "vae")
    r = _script("--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "o")
    assert r.returncode == 2 and "has no 'vae' folder" in r.stderr and "AutoencoderKL" in r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = _script("--output_dir", blocker / "sub", "--max_train_steps", 1)
    assert r.returncode == 2 and "--output_dir" in r.stderr and "not writable" in r.stderr


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import safetensors.torch as st

    out = tmp_path / "o"
    run(TextToImageTask, argv(out, 2, "--checkpointing_steps", "2"))
    real = st.save_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]) if len(a) > 1 else "")

    monkeypatch.setattr(st, "save_file", full)
    rc = main(TextToImageTask, argv(out, 4, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
    monkeypatch.setattr(st, "save_file", real)
    err = capsys.readouterr().err
    assert rc == 3 and "disk full" in err
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    _all_visible_checkpoints_good(out)


# --------------------------------------------------------------------------------- 6. two real processes

@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(tmp_path, embedded_paths):
    common = ["--max_train_steps", "2", "--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay",
              "0", "--lr_warmup_steps", "0", "--per_sample_noise", "--checkpointing_steps", "2", *QUIET]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        SCRIPT, "--output_dir", str(two), "--train_batch_size", "4", *common],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sums = sorted(l.split()[-1] for l in r.stdout.splitlines() if "final weights checksum" in l)
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold identical weights
    s2 = json.load(open(two / "train_summary.json"))
    assert s2["world_size"] == 2 and s2["global_batch"] == 8
    # Only rank 0 logs step lines and writes files (each rank adds only its own RNG state to a checkpoint).
    assert r.stdout.count("step 2/2 step_loss=") == 1
    assert sorted(os.listdir(two / "checkpoint-2")) == sorted(
        ["COMPLETE", "lr_scheduler.pt", "optimizer.pt", "rng_0.pt", "rng_1.pt", "train_state.json",
         "unet.safetensors"])
    one = tmp_path / "one"
    r1 = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(one), "--train_batch_size", "8", *common],
                        capture_output=True, text=True, timeout=900, env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = weights(two), weights(one)
    base = weights(embedded_paths["model"])
    da = torch.cat([(a[k] - base[k]).flatten() for k in base])
    db = torch.cat([(b[k] - base[k]).flatten() for k in base])
    # Same global batch, same per-sample noise: the same update up to float summation order (stated tolerance:
    # 1e-3 relative to the largest update).
    assert (da - db).abs().max() <= 1e-3 * db.abs().max()
