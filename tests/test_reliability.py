"""Reliability (issue #14): finished work is never deleted, signals are handled over the whole run, resume
refuses what would silently change the run, checkpoints never hold poisoned weights, and kills at seeded
random moments (inside saves, the final save and pruning included) never leave a partial folder visible as
complete and always resume to bit-identical weights."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess

import pytest
import torch

from diffusers_npu import checkpoint as ckpt
from trainkit import argv, main_rc, same_weights, train, weights

T2I = "text_to_image"


def _no_temp_left(folder):
    names = os.listdir(folder)
    assert not [n for n in names if n.startswith(".tmp-") or n.endswith(".old")], names


def _checkpoints_all_good(folder):
    for _, path in ckpt.list_checkpoints(str(folder), complete_only=False):
        assert ckpt.is_complete(path), f"{path} visible without its COMPLETE marker"
        json.load(open(os.path.join(path, "train_state.json")))
        assert os.path.isfile(os.path.join(path, "optimizer", ".metadata"))  # torch.distributed.checkpoint
        weights(path)


# ------------------------------------------------------------------------------------------- data loss
def test_failure_after_the_final_save_keeps_finished_lora_and_embeddings(tmp_path, capsys, monkeypatch):
    from diffusers_npu.train import evaluation

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "train_summary.json")

    monkeypatch.setattr(evaluation, "write_summary", disk_full)
    for task, flags, kept in ((T2I, ["--use_lora"], "pytorch_lora_weights.safetensors"),
                              ("textual_inversion", [], "learned_embeds.safetensors")):
        out = tmp_path / task
        rc, _, err = main_rc(task, argv(out, 1, *flags, batch=2), capsys)
        assert rc == 3 and "disk full while writing train_summary.json" in err
        assert f"finished output kept in {out}" in err  # a true message: no checkpoint was claimed
        assert os.path.isfile(out / kept)


def test_lora_into_a_folder_holding_a_pipeline_keeps_the_pipeline_loadable(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "o"
    train(T2I, out, steps=1)
    train(T2I, out, "--use_lora", steps=1)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # model_index.json survived
    pipe.load_lora_weights(str(out))


def test_stale_temp_folders_are_collected_at_start_up_and_logged(tmp_path, capsys):
    out = tmp_path / "o"
    train(T2I, out, steps=2, ckpt=2)
    os.makedirs(out / ".tmp-checkpoint-9")
    (out / ".tmp-checkpoint-9" / "optimizer.pt").write_bytes(b"x" * 100)
    os.makedirs(out / "unet.old")
    os.makedirs(out / "checkpoint-7")  # half-pruned: its marker went first
    rc, stdout, _ = main_rc(T2I, argv(out, 3, "--resume_from_checkpoint", "latest"), capsys)
    assert rc == 0
    for name in (".tmp-checkpoint-9", "unet.old", "checkpoint-7"):
        assert not os.path.exists(out / name) and name in stdout
    _no_temp_left(out)


def test_checkpoint_files_are_fsynced_before_the_marker(tmp_path, monkeypatch):
    from diffusers_npu import fsutil

    synced = []
    real = fsutil.fsync_file
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: (synced.append(os.path.basename(p)), real(p))[1])
    train(T2I, tmp_path / "o", steps=1, ckpt=1)
    for name in ("__0_0.distcp", "train_state.json", "diffusion_pytorch_model.safetensors", "rng_0.pt"):
        assert name in synced


def test_prune_never_deletes_under_the_checkpoints_own_name(tmp_path, monkeypatch):
    out = tmp_path / "o"
    train(T2I, out, steps=2, ckpt=1)
    seen = []
    real = shutil.rmtree

    def spy(path, *a, **k):
        seen.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", spy)
    assert len(ckpt.prune(str(out), 1)) == 1 and seen == [".tmp-removing-checkpoint-1"]


# ------------------------------------------------------------------------------------------- signals
def _signal_at(monkeypatch, owner, name, sig, times=1):
    real = getattr(owner, name)

    def wrapper(*a, **k):
        for _ in range(times):
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, wrapper)


def test_signal_during_final_validation_saves_a_checkpoint_and_exits_zero(tmp_path, capsys, monkeypatch):
    from diffusers_npu.train.loop import Trainer

    out = tmp_path / "o"
    real = Trainer.validate

    def validate(self, tag):
        if tag == "final":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, tag)

    monkeypatch.setattr(Trainer, "validate", validate)
    flags = ["--validation_prompts", "a handwritten digit one", "--num_validation_images", "1",
             "--validation_inference_steps", "2", "--use_ema", "--resume_from_checkpoint", "latest"]
    rc, stdout, _ = main_rc(T2I, argv(out, 3, *flags), capsys)
    assert rc == 0 and "Pre-empted" in stdout
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [3] and not os.path.exists(out / "model_index.json")
    _no_temp_left(out)
    monkeypatch.setattr(Trainer, "validate", real)
    reference = tmp_path / "ref"
    train(T2I, reference, *flags, steps=3)
    rc, _, _ = main_rc(T2I, argv(out, 3, *flags), capsys)
    assert rc == 0 and same_weights(weights(out), weights(reference))  # EMA swapped back before the checkpoint


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_final_save_lets_it_finish(tmp_path, capsys, monkeypatch, sig):
    from diffusers_npu.train.tasks.text_to_image import TextToImageTask

    _signal_at(monkeypatch, TextToImageTask, "save_final", sig)
    out = tmp_path / "o"
    rc, stdout, err = main_rc(T2I, argv(out, 2), capsys)
    assert rc == 0 and "Traceback" not in err
    assert os.path.isfile(out / "model_index.json")
    _no_temp_left(out)
    assert json.load(open(out / "train_summary.json"))["exit_reason"] == "preempted"


def test_second_signal_stops_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    from diffusers_npu.train.loop import Trainer

    out = tmp_path / "o"
    train(T2I, out, steps=1, ckpt=1)
    _signal_at(monkeypatch, Trainer, "train_step", signal.SIGTERM, times=2)
    rc, _, err = main_rc(T2I, argv(out, 4, "--resume_from_checkpoint", "latest"), capsys)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: stopped by SIGTERM during training (second signal); the last complete checkpoint is "
        f"{out / 'checkpoint-1'}"]
    _no_temp_left(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_start_up_leaves_no_empty_folder(tmp_path, capsys, monkeypatch, sig):
    from diffusers_npu.train import build

    _signal_at(monkeypatch, build, "data", sig)
    out = tmp_path / "o"
    rc, _, err = main_rc(T2I, argv(out, 2), capsys)
    assert rc == 128 + sig and err.strip() == \
        f"error: stopped by {signal.Signals(sig).name} during start-up; no checkpoint was saved yet"
    assert not os.path.exists(out)


# --------------------------------------------------------------------------------- resume that cannot work
def test_changed_batch_or_resolution_is_refused_and_a_new_learning_rate_applied(tmp_path, capsys):
    out = tmp_path / "o"
    train(T2I, out, "--learning_rate", "1e-4", steps=2, ckpt=2)
    rc, _, err = main_rc(T2I, argv(out, 3, "--resume_from_checkpoint", "latest", batch=8), capsys)
    assert rc == 2 and "global batch of 4 per micro-step" in err and "this run has 8" in err
    rc, _, err = main_rc(T2I, argv(out, 3, "--resume_from_checkpoint", "latest", "--resolution", "24"), capsys)
    assert rc == 2 and "--resolution = 16, this run has 24" in err
    s = train(T2I, out, "--learning_rate", "3e-4", "--resume_from_checkpoint", "latest", steps=3)
    assert s["learning_rate_changed_on_resume"] == {"checkpoint": 1e-4, "now": 3e-4}
    assert s["config"]["learning_rate"] == 3e-4 and s["learning_rate"] == 3e-4


def test_new_learning_rate_on_resume_scales_the_schedule_from_the_resumed_step(tmp_path):
    out = tmp_path / "o"
    flags = ["--lr_scheduler", "linear", "--lr_warmup_steps", "0"]
    train(T2I, out, "--learning_rate", "1e-3", *flags, steps=4, ckpt=2)
    for name in ("checkpoint-4", "unet", "model_index.json"):  # back to the state after step 2
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(T2I, out, "--learning_rate", "2e-3", *flags, "--resume_from_checkpoint", "latest", steps=4, ckpt=2)
    history = json.load(open(out / "checkpoint-4" / "train_state.json"))["history"]
    # linear decay over 4 steps: 1e-3 * (1 - k/4) after step k; from step 3 on the base rate is 2e-3
    assert [h["lr"] for h in history] == pytest.approx([7.5e-4, 5e-4, 5e-4, 0.0])


def test_checkpoint_of_another_model_and_missing_files_are_checkpoint_errors(tmp_path, capsys, embedded_paths):
    out = tmp_path / "o"
    train(T2I, out, steps=2, ckpt=2)
    from diffusers import UNet2DConditionModel

    # another model: a UNet with other widths in the checkpoint's place
    other = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                 norm_num_groups=16, attention_head_dim=8)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    other.save_pretrained(str(bad / "checkpoint-2" / "unet"))
    os.remove(bad / "checkpoint-2" / "manifest.json")  # as an earlier version wrote it (else: damaged, fallback)
    (bad / "checkpoint-2" / "COMPLETE").write_text('{"step": 2, "world_size": 1, "layout": 2}')
    capsys.readouterr()  # the training's own output
    rc, _, err = main_rc(T2I, argv(bad, 3, "--resume_from_checkpoint", "latest"), capsys)
    assert rc == 2 and err.startswith("error: ") and "does not match the model being trained" in err
    assert "Traceback" not in err
    shutil.rmtree(out / "checkpoint-2" / "optimizer")  # a half-deleted checkpoint that kept its marker
    rc, _, err = main_rc(T2I, argv(out, 3, "--resume_from_checkpoint", "checkpoint-2"), capsys)
    assert rc == 3 and "checkpoint-2/optimizer/" in err and " is missing (expected " in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ wrong result, silently
def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    """An update that poisons the weights while the step's loss (computed before it) is finite: what a huge
    learning rate did before the flags refused non-finite values."""
    from diffusers_npu.train.tasks.text_to_image import TextToImageTask

    out = tmp_path / "o"
    train(T2I, out, steps=1, ckpt=1)
    real = TextToImageTask.after_optimizer_step

    def poison(self, step):
        real(self, step)
        if step == 2:
            with torch.no_grad():
                next(self.unet.parameters()).fill_(float("inf"))

    monkeypatch.setattr(TextToImageTask, "after_optimizer_step", poison)
    rc, _, err = main_rc(T2I, argv(out, 3, "--resume_from_checkpoint", "latest", ckpt=1), capsys)
    assert rc == 3 and "step 2: the trained weights or the optimizer state hold NaN/inf" in err
    assert f"the last complete checkpoint is {out / 'checkpoint-1'}" in err
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [1]
    _no_temp_left(out)
    assert all(torch.isfinite(v).all() for v in weights(out / "checkpoint-1").values())


def test_fp16_run_whose_every_step_overflows_stops_with_a_named_error(tmp_path, capsys, monkeypatch):
    from diffusers_npu.train.tasks.text_to_image import TextToImageModule

    real = TextToImageModule.forward
    monkeypatch.setattr(TextToImageModule, "forward", lambda self, b: (real(self, b)[0] * float("inf"), {}))
    rc, _, err = main_rc(T2I, argv(tmp_path / "o", 8, "--mixed_precision", "fp16", "--max_consecutive_overflows",
                                   "3", "--optimizer", "fused_adamw", batch=2), capsys)
    assert rc == 3 and "the last 4 steps all overflowed and were skipped" in err
    assert "--max_consecutive_overflows" in err


def test_nan_loss_in_fp32_stops_naming_the_step(tmp_path, capsys, monkeypatch):
    from diffusers_npu.train.tasks.text_to_image import TextToImageModule

    real = TextToImageModule.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        loss, extra = real(self, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), extra

    monkeypatch.setattr(TextToImageModule, "forward", forward)
    out = tmp_path / "o"
    rc, _, err = main_rc(T2I, argv(out, 6, "--log_every", "5", ckpt=2), capsys)
    assert rc == 3 and "step 3: the loss is nan" in err
    assert [s for s, _ in ckpt.list_checkpoints(str(out))] == [2]


def test_summary_records_the_precision_really_used(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mixed_precision: bf16\n")
    s = train(T2I, tmp_path / "o", "--config", cfg, steps=1)
    assert s["mixed_precision"] == "bf16" and s["config"]["mixed_precision"] == "bf16"


# ---------------------------------------------------------------------------------------- real disk full
PAGE = 4096
#: the order in which a 1-process checkpoint's files are written (then .ranks/0.json, manifest.json, COMPLETE)
WRITE_ORDER = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "rng_0.pt",
               "optimizer/__0_0.distcp", "optimizer/.metadata",  # torch.distributed.checkpoint: data, then metadata
               "lr_scheduler.pt", "precision.pt", "train_state.json"]


def _disk_full_sizes(manifest_files):
    """tmpfs sizes (bytes) from "nothing fits" to "the second checkpoint does not fit": the disk fills up
    inside each file of the first checkpoint in turn, in each step of its commit (rank part, manifest,
    marker), and inside the two large files of the second."""
    pages = {rel: -(-e["size"] // PAGE) for rel, e in manifest_files.items()}
    assert sorted(pages) == sorted(WRITE_ORDER), sorted(pages)
    sizes, before = [1], 0
    for rel in WRITE_ORDER:
        if rel not in ("unet/config.json", "precision.pt", "optimizer/.metadata"):  # one-page files next to a tested neighbour
            sizes.append(before + pages[rel] // 2)
        before += pages[rel]
    sizes += [before, before + 1, before + 2]  # .ranks/0.json, manifest.json, COMPLETE do not fit
    one = before + 3
    sizes += [one + pages["unet/diffusion_pytorch_model.safetensors"] // 2, one + before - 2]
    return [s * PAGE for s in sizes]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_real_disk_full_at_every_size_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    ref = tmp_path / "ref"
    train(T2I, ref, steps=1, ckpt=1)
    sizes = _disk_full_sizes(json.load(open(ref / "checkpoint-1" / "manifest.json"))["files"])
    seen = set()
    for size in sizes:
        for rep in range(3):
            mnt = tmp_path / f"m{size}-{rep}"
            mnt.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode != 0:
                pytest.skip("cannot mount a tmpfs here")
            try:
                out = mnt / "o"
                capsys.readouterr()
                rc, _, err = main_rc(T2I, argv(out, 2, ckpt=1), capsys)
                case = f"tmpfs of {size} bytes, run {rep}: rc {rc}\n{err[-3000:]}"
                lines = err.strip().splitlines()
                assert rc == 3 and len(lines) == 1 and lines[0].startswith("error: disk full while writing "), case
                good = [s for s, _ in ckpt.list_checkpoints(str(out))]
                assert good in ([], [1]), case
                note = f"the last complete checkpoint is {out / 'checkpoint-1'}" if good else "no checkpoint was saved yet"
                assert lines[0].endswith(note), case
                for _, path in ckpt.list_checkpoints(str(out)):
                    assert ckpt.check(path) is None, case  # what is left complete verifies
                if os.path.isdir(out):
                    _no_temp_left(out)
                seen.add((tuple(good), lines[0].split(": ", 2)[-1].split(";")[0][:40]))
            finally:
                subprocess.run(["umount", "-l", str(mnt)])  # lazy: a file may still be mapped by this process
    assert {g for g, _ in seen} == {(), (1,)}, seen  # both sides of the first checkpoint were reached


# -------------------------------------------------------------------------- kills at seeded random moments
IO_CALLS = [("os", "replace"), ("os", "rename"), ("os", "remove"), ("os", "fsync"), ("shutil", "rmtree"),
            ("torch", "save")]


def _run_forked(task, args, kill_at=None):
    """Run main() in a forked child; with ``kill_at`` the child dies like ``kill -9`` (os._exit: no cleanup,
    no finally blocks) just before its kill_at-th file-system call. Returns (exit status, calls made)."""
    import importlib

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        count = [0]

        def hook(real):
            def wrapper(*a, **k):
                count[0] += 1
                if kill_at is not None and count[0] == kill_at:
                    os._exit(137)
                return real(*a, **k)
            return wrapper

        for mod, name in IO_CALLS:
            m = importlib.import_module(mod)
            setattr(m, name, hook(getattr(m, name)))
        import sys

        sys.stdout = sys.stderr = open(os.devnull, "w")
        from diffusers_npu.train import main

        rc = main(task, args)
        os.write(w, str(count[0]).encode())
        os._exit(rc)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    calls = os.read(r, 64).decode()
    os.close(r)
    return os.waitstatus_to_exitcode(status), int(calls) if calls else None


@pytest.mark.slow
def test_kills_at_twenty_seeded_random_moments_never_lose_a_checkpoint_or_the_result(tmp_path, embedded_paths):
    flags = ["--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"]
    ref = tmp_path / "ref"
    assert _run_forked(T2I, argv(ref, 5, *flags, batch=2, ckpt=1))[0] == 0  # also warms the data set cache
    rc, total = _run_forked(T2I, argv(tmp_path / "count", 5, *flags, batch=2, ckpt=1))
    assert rc == 0 and total > 40
    expected = weights(ref)
    rng = random.Random(1234)
    # seeded random points over the whole run, plus the last calls (the final save) and a prune's
    points = sorted(rng.sample(range(1, total + 1), 18)) + [total - 1, total]
    for i, k in enumerate(points):
        out = tmp_path / f"k{i}"
        rc, _ = _run_forked(T2I, argv(out, 5, *flags, batch=2, ckpt=1), kill_at=k)
        assert rc == 137, (k, rc)
        if os.path.isdir(out):
            _checkpoints_all_good(out)  # nothing partial visible as complete
        rc, _ = _run_forked(T2I, argv(out, 5, *flags, batch=2, ckpt=1))
        assert rc == 0, k
        _no_temp_left(out)
        assert same_weights(weights(out), expected), f"kill at file-system call {k} of {total}"
