"""The throughput harnesses (bench/) and the fast training modes they measure, offline on CPU.

* the training harness times the REAL step: ``Trainer.train_step`` is what runs in the timed window (patched
  and counted), each Trainer mode records the training command it ran and that command parses with the
  training script's own parser into the flags the Trainer saw; ``--flags`` (and a ``--config`` inside them)
  reach the Trainer; the reference row says it is a re-implementation; ``--upstream_script`` is timed from the
  script's progress-bar updates; ``--nproc 2`` under ddp and fsdp (slow) and ``bench/gpu_run.sh --smoke``
  (slow) run end to end;
* the FLOP counter against hand-computed conv/matmul counts, and the SD 2.1-base counts against the issue's;
* the inference harness runs plain vs ours;
* ``--cache_latents`` trains the same model as the online path: the real trainer
  (``diffusers_npu.train.run``), same seed and data, 20 steps each, mean losses within noise;
* the latent cache is rebuilt under a new key when the model, the resolution or the flip augmentation changes,
  reused otherwise, and holds both orientations (exactly the VAE posterior of the flipped image) with flips.

Everything uses tiny models and data sets made here; torch runs one thread (a shared 2-core machine is 5-20x
slower with two).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import time

import pytest
import torch

TRAIN_STEPS = 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD pipeline folder (preset 'tiny', random weights) and a 16-row image/caption data set."""
    import numpy as np
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from diffusers_npu.presets import DIGIT_WORDS, build_components, save_pipeline_folder

    root = tmp_path_factory.mktemp("throughput")
    comps = build_components("tiny", seed=0, tokenizer_dir=str(root / "tok"))
    model = save_pipeline_folder(comps, str(root / "model"))
    rng = np.random.default_rng(0)
    images, captions = [], []
    for i in range(16):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        images.append(PILImage.fromarray(low).resize((32, 32), PILImage.BILINEAR))
        captions.append(f"a photo of the digit {DIGIT_WORDS[i % 10]}")
    ds = Dataset.from_dict({"image": images, "text": captions},
                           features=Features({"image": Image(), "text": Value("string")}))
    ds.save_to_disk(str(root / "data"))
    return {"root": root, "model": model, "data": str(root / "data"), "images": images}


def _train(tiny, out, *extra, model=None, steps=TRAIN_STEPS):
    """One real training run; returns (summary, per-step losses parsed from the step log lines)."""
    from diffusers_npu.train import run
    from diffusers_npu.train.tasks.text_to_image import TextToImageTask

    argv = ["--pretrained_model_name_or_path", model or tiny["model"], "--local_data_dir", tiny["data"],
            "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "4", "--max_train_steps",
            str(steps), "--seed", "0", "--device", "cpu", "--report_to", "none", "--disable_progress_bar",
            "--log_every", "1", *[str(x) for x in extra]]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = run(TextToImageTask, argv)
    losses = [float(x) for x in re.findall(r"step_loss=(\S+)", buf.getvalue())]
    return summary, losses


# ------------------------------------------------------------------------------------ (a) training harness
STEPS, WARMUP, BATCH = 3, 1, 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One harness run on the tiny preset (online, reference and two --flags modes) with Trainer.train_step
    wrapped: every call is recorded with its trainer, its flags and its start/end times."""
    from diffusers_npu.benchmark.train import main
    from diffusers_npu.train.loop import Trainer

    root = tmp_path_factory.mktemp("bench")
    config = root / "run.yaml"
    config.write_text("train_batch_size: 3\nuse_ema: true\nlr_scheduler: cosine\n")
    calls = []
    original = Trainer.train_step

    def recording_step(self, loader):
        t0 = time.perf_counter()
        original(self, loader)
        calls.append({"trainer": id(self), "args": self.args, "t0": t0, "t1": time.perf_counter()})

    argv = ["--preset", "tiny", "--device", "cpu", "--modes", "online,reference", "--steps", str(STEPS),
            "--warmup", str(WARMUP), "--batch_size", str(BATCH), "--work_dir", str(root / "work"),
            "--json", str(root / "train.json"),
            "--flags=--noise_offset 0.05 --train_batch_size 3", f"--flags=--config {config}"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(Trainer, "train_step", recording_step)
        result = main(argv)
    return {"result": result, "calls": calls, "printed": out.getvalue(), "root": root,
            "rows": {r["mode"]: r for r in result["modes"]},
            "saved": json.loads((root / "train.json").read_text())}


def _calls_by_trainer(calls):
    by = {}
    for c in calls:
        by.setdefault(c["trainer"], []).append(c)
    return list(by.values())


def test_the_timed_function_is_trainer_train_step(bench):
    rows = bench["rows"]
    trainer_rows = [rows[m] for m in ("online", "flags1", "flags2")]
    for r in trainer_rows:
        assert "error" not in r, r
        assert r["figure"] == "Trainer.train_step"
    runs = _calls_by_trainer(bench["calls"])
    assert len(runs) == 3  # one Trainer per Trainer mode (the reference never builds one)
    for r, calls in zip(trainer_rows, runs):
        assert len(calls) == WARMUP + STEPS  # every step ran through Trainer.train_step, no other step
        timed = calls[-STEPS:]
        # The timed window holds the last STEPS calls whole; images/s is what they processed over it.
        assert r["wall_s"] >= sum(c["t1"] - c["t0"] for c in timed)
        batch = calls[0]["args"].train_batch_size
        assert r["images_per_sec"] == pytest.approx(batch * STEPS / r["wall_s"])
        assert r["ms_per_step"] == pytest.approx(1000 * r["wall_s"] / STEPS)
        assert math.isfinite(r["mean_loss"]) and r["nonfinite_losses"] == 0
        # What one rank holds: fp32 UNet parameters, and AdamW's two moments of each.
        assert r["param_bytes"] == 4 * r["trained_parameters"]
        assert r["optimizer_state_bytes"] == 2 * r["param_bytes"]


def test_each_mode_records_a_training_command_that_the_script_parses(bench, repo_root):
    from diffusers_npu.train.config import parse_args
    from diffusers_npu.train.tasks.text_to_image import TextToImageTask

    runs = _calls_by_trainer(bench["calls"])
    for mode, calls in zip(("online", "flags1", "flags2"), runs):
        row = bench["saved"]["modes"][[r["mode"] for r in bench["saved"]["modes"]].index(mode)]
        words = shlex.split(row["command"])
        assert words[:3] == ["OMP_NUM_THREADS=1", "python", "examples/text_to_image/train_text_to_image.py"]
        assert os.path.isfile(os.path.join(repo_root, words[2]))
        argv = words[3:]
        assert argv == row["argv"]
        parsed = parse_args(TextToImageTask, argv)  # the parser train_text_to_image.py runs
        seen = calls[0]["args"]  # what the Trainer was built with
        for key in ("pretrained_model_name_or_path", "train_data_dir", "resolution", "train_batch_size",
                    "max_train_steps", "noise_offset", "use_ema", "lr_scheduler", "center_crop", "random_flip"):
            assert getattr(parsed, key) == getattr(seen, key), key
        assert parsed.max_train_steps == WARMUP + STEPS
    # The command names user files: a pipeline folder and an image folder with metadata.jsonl.
    online = bench["rows"]["online"]
    model, data = online["argv"][1], online["argv"][3]
    assert online["argv"][0] == "--pretrained_model_name_or_path" and online["argv"][2] == "--train_data_dir"
    assert os.path.isfile(os.path.join(model, "model_index.json"))
    lines = open(os.path.join(data, "metadata.jsonl")).read().splitlines()
    assert len(lines) == 4 * BATCH and all(os.path.isfile(os.path.join(data, json.loads(ln)["file_name"]))
                                           for ln in lines)


def test_flags_and_their_config_file_reach_the_trainer(bench):
    online, flags1, flags2 = (c[0]["args"] for c in _calls_by_trainer(bench["calls"]))
    assert (online.noise_offset, online.train_batch_size, online.use_ema) == (0.0, BATCH, False)
    # --flags win over the harness's defaults, which are then not passed at all.
    assert (flags1.noise_offset, flags1.train_batch_size) == (0.05, 3)
    assert bench["rows"]["flags1"]["argv"].count("--train_batch_size") == 1
    # A --config file inside --flags: its keys are the user's too (the harness's --train_batch_size would win
    # over the file, so it must not be on the command line).
    assert (flags2.train_batch_size, flags2.use_ema, flags2.lr_scheduler) == (3, True, "cosine")
    assert "--train_batch_size" not in bench["rows"]["flags2"]["argv"]
    assert bench["rows"]["flags2"]["images_per_sec"] == pytest.approx(3 * STEPS / bench["rows"]["flags2"]["wall_s"])


def test_reference_row_says_it_is_the_upstream_step_reimplemented(bench):
    ref = bench["rows"]["reference"]
    assert "error" not in ref, ref
    assert ref["label"] == "upstream step, re-implemented here" and ref["figure"] != "Trainer.train_step"
    assert ref["vs_reference"] == 1.0 and "command" not in ref
    assert re.search(r"^reference\*\s+text_to_image\s+fp32", bench["printed"], re.M)
    assert "reference*: the upstream step, re-implemented here" in bench["printed"]
    online = bench["rows"]["online"]
    assert online["vs_reference"] == pytest.approx(online["images_per_sec"] / ref["images_per_sec"])
    # TFLOP/s counts what each step executes (the encoders run in both of these steps).
    fl = bench["saved"]["flops_per_image"]["32"]
    per_image = fl["full_fwd_bwd"] + fl["vae_encoder_fwd"] + fl["text_encoder_fwd"]
    assert online["tflops_per_device"] == pytest.approx(per_image * online["images_per_sec"] / 1e12)


FAKE_UPSTREAM = """
import argparse, os, sys, time
from tqdm.auto import tqdm
p = argparse.ArgumentParser()
for flag in ("--pretrained_model_name_or_path", "--train_data_dir", "--output_dir", "--resolution",
             "--train_batch_size", "--max_train_steps", "--learning_rate", "--lr_scheduler", "--max_grad_norm",
             "--checkpointing_steps", "--seed", "--dataloader_num_workers", "--mixed_precision", "--fail_at"):
    p.add_argument(flag)
p.add_argument("--center_crop", action="store_true")
p.add_argument("--random_flip", action="store_true")
args = p.parse_args()
with open(os.environ["FAKE_LOG"], "w") as f:
    f.write(" ".join(sys.argv[1:]))
bar = tqdm(range(int(args.max_train_steps)), desc="Steps")
other = tqdm(range(3), desc="not the training bar")
for step in range(int(args.max_train_steps)):
    time.sleep(0.02 * (step + 1))  # steps take 20, 40, 60, ... ms
    if args.fail_at and step == int(args.fail_at):
        raise RuntimeError("boom in the upstream step")
    other.update(1)
    bar.update(1)
"""


def test_upstream_script_is_timed_between_its_progress_bar_updates(tmp_path, monkeypatch, bench):
    from diffusers_npu.benchmark.train import main

    script = tmp_path / "train_text_to_image.py"
    script.write_text(FAKE_UPSTREAM)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "argv.txt"))
    work = str(bench["root"] / "work")
    common = ["--preset", "tiny", "--device", "cpu", "--modes", "upstream", "--steps", "3", "--warmup", "2",
              "--batch_size", str(BATCH), "--work_dir", work, "--upstream_script", str(script)]
    with contextlib.redirect_stdout(io.StringIO()):
        row = main(common)["modes"][0]
    assert "error" not in row, row
    got = open(tmp_path / "argv.txt").read().split()
    assert got[got.index("--train_data_dir") + 1] == bench["rows"]["online"]["argv"][3]  # the same data folder
    assert got[got.index("--max_train_steps") + 1] == "5"
    # Steps 3..5 sleep 60 + 80 + 100 ms: the window spans them (and the stamps only), not the start-up.
    assert 0.24 <= row["wall_s"] < 1.5
    assert row["images_per_sec"] == pytest.approx(BATCH * 3 / row["wall_s"])
    assert row["label"] == "the upstream script" and row["command"].startswith(f"python {script} ")

    with contextlib.redirect_stdout(io.StringIO()):
        row = main(common + ["--upstream_flags", "--fail_at 1"])["modes"][0]
    assert "images_per_sec" not in row
    assert "exit code 1" in row["error"] and "boom in the upstream step" in row["error"]


def test_bad_harness_input_is_one_line_naming_the_flag(tmp_path, capsys):
    from diffusers_npu.benchmark.train import cli

    cases = [(["--modes", "online,bogus"], "--modes: unknown ['bogus']"),
             (["--upstream_script", str(tmp_path / "nope.py")], "--upstream_script: "),
             (["--modes", "upstream"], "--modes upstream needs --upstream_script"),
             (["--nproc", "2", "--distributed", "ddp,zero"], "--distributed: unknown engine(s) ['zero']"),
             (["--resolution", "30"], "--resolution must be a multiple of 8"),
             (["--stpes", "3"], "--stpes"),
             (["--flags=--snr_gama 5"], "mode flags (text_to_image, flags '--snr_gama 5'): unrecognized arguments")]
    for argv, message in cases:
        assert cli(["--preset", "tiny", "--device", "cpu"] + argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_report_per_rank_memory_and_scaling(tmp_path, bench):
    """About 2-3 minutes on 2 CPU cores: three child runs (1 process, ddp x2, fsdp x2)."""
    from diffusers_npu.benchmark.train import main

    with contextlib.redirect_stdout(io.StringIO()):
        result = main(["--preset", "tiny", "--device", "cpu", "--modes", "online", "--steps", "2", "--warmup", "1",
                       "--batch_size", str(BATCH), "--nproc", "2", "--distributed", "ddp,fsdp",
                       "--work_dir", str(bench["root"] / "work")])
    single, ddp, fsdp = result["modes"]
    for r in (single, ddp, fsdp):
        assert "error" not in r, r
    assert (single["nproc"], ddp["engine"], fsdp["engine"]) == (1, "ddp", "fsdp")
    assert ddp["world_size"] == fsdp["world_size"] == 2 and ddp["distributed"] == "ddp"
    assert ddp["images_per_sec"] == pytest.approx(2 * ddp["images_per_sec_per_device"])
    assert ddp["scaling_efficiency"] == pytest.approx(ddp["images_per_sec"] / (2 * single["images_per_sec"]))
    assert len(ddp["peak_memory_bytes_per_rank"]) == 2 and min(ddp["peak_memory_bytes_per_rank"]) > 0
    # DDP replicates the parameters and AdamW state; FSDP shards them: each rank holds about half.
    state = {r["engine"]: r["param_bytes"] + r["optimizer_state_bytes"] for r in (ddp, fsdp)}
    assert state["ddp"] == single["param_bytes"] + single["optimizer_state_bytes"]
    assert 0.45 <= state["fsdp"] / state["ddp"] <= 0.6
    assert ddp["command"].startswith("OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 ")
    assert "--distributed fsdp" in fsdp["command"]


@pytest.mark.slow
def test_gpu_run_script_smoke_on_cpu(tmp_path, repo_root):
    """About 1.5 minutes: bench/gpu_run.sh --smoke runs the GPU sequence with tiny presets on CPU (SD, the SD3 /
    FLUX DreamBooth rows, SDXL)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    proc = subprocess.run(["bash", os.path.join(repo_root, "bench", "gpu_run.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sd = json.loads((tmp_path / "out" / "train_tiny.json").read_text())
    sdxl = json.loads((tmp_path / "out" / "train_sdxl-tiny.json").read_text())
    assert [r["mode"] for r in sd["modes"]] == ["online", "cached", "reference"]
    assert [(r["mode"], r["task"]) for r in sdxl["modes"]] == [
        ("online", "text_to_image_sdxl"), ("lora", "text_to_image_sdxl"), ("controlnet", "controlnet_sdxl")]
    for r in sd["modes"] + sdxl["modes"]:
        assert r["images_per_sec"] > 0, r
    assert sdxl["modes"][1]["resolved"]["use_lora"] is True
    # the diffusion-transformer rows (tiny sizes): the DreamBooth scripts' Trainer step
    dit = {name: json.loads((tmp_path / "out" / f"{name}.json").read_text())["modes"]
           for name in ("train_sd3-tiny", "train_sd3-tiny_lora", "train_flux-tiny")}
    assert [[(r["mode"], r["task"]) for r in rows] for rows in dit.values()] == [
        [("online", "dreambooth_sd3")], [("lora", "dreambooth_lora_sd3")], [("online", "dreambooth_flux")]]
    for rows in dit.values():
        assert rows[0]["images_per_sec"] > 0 and rows[0]["figure"] == "Trainer.train_step", rows
    assert dit["train_sd3-tiny"][0]["resolved"]["gradient_checkpointing"] is True
    assert (tmp_path / "out" / "versions.txt").read_text().startswith("python ")


# --------------------------------------------------------------------------------------------- (a') FLOPs
def test_flop_counter_matches_hand_counted_conv_and_matmul_flops():
    from diffusers_npu.benchmark.flops import count_flops

    conv, lin = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(800, 5)
    x = torch.randn(1, 3, 10, 10)

    def step():
        lin(conv(x).flatten(1)).sum().backward()

    conv_fwd = 2 * 8 * 10 * 10 * (3 * 3 * 3)  # 2 x outputs x (inputs per output)
    lin_fwd = 2 * 800 * 5
    # Backward: conv weight gradient (the input needs none), linear input and weight gradients.
    assert count_flops(step) == conv_fwd + lin_fwd + conv_fwd + 2 * lin_fwd
    conv.requires_grad_(False)  # frozen, as the UNet under LoRA: no conv backward at all, no linear input grad
    assert count_flops(step) == conv_fwd + lin_fwd + lin_fwd
    a, b = torch.randn(4, 6, 7), torch.randn(4, 7, 5)
    assert count_flops(lambda: torch.bmm(a, b)) == 2 * 4 * 6 * 7 * 5


def test_flop_counts_match_the_issue_figures_for_sd21_base():
    """Independent figures (issue #7): UNet fwd+bwd 2.47 T, VAE encoder 1.12 T, OpenCLIP-H 0.045 T at 512 px."""
    from diffusers_npu.benchmark.flops import count_training_flops
    from diffusers_npu.presets import get_preset

    fl = count_training_flops(get_preset("sd21-base"), 512, 77, kinds=("full", "lora"))
    assert fl["unet_fwd_bwd"] / 1e12 == pytest.approx(2.47, rel=0.05)
    assert fl["vae_encoder_fwd"] / 1e12 == pytest.approx(1.12, rel=0.02)
    assert fl["text_encoder_fwd"] / 1e12 == pytest.approx(0.045, rel=0.05)
    # LoRA: forward + input gradients of the frozen UNet, about 2/3 of the full step.
    assert 0.6 < fl["lora_fwd_bwd"] / fl["full_fwd_bwd"] < 0.75


def test_infer_harness_plain_vs_ours(tmp_path, capsys):
    from diffusers_npu.benchmark.infer import HEADERS, main

    out = tmp_path / "infer.json"
    result = main(["--preset", "tiny", "--device", "cpu", "--steps", "3", "--resolution", "32", "--batch_sizes",
                   "1,2", "--repeats", "1", "--warmup_steps", "1", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    for h in HEADERS:
        assert h in printed
    runs = [(r["variant"], r["batch"]) for r in result["runs"]]
    assert runs == [("plain", 1), ("plain", 2), ("ours", 1), ("ours", 2)]
    for r in result["runs"]:
        assert "error" not in r, r
        assert r["its_per_sec"] > 0 and r["seconds_per_image"] > 0
    assert "attention=flash" in result["runs"][-1]["setup"] and "compile" not in result["runs"][-1]["setup"]
    assert json.loads(out.read_text())["config"]["compile"] is False  # no CUDA, no compile by default


# ------------------------------------------------------------------------- (b) cached trains the same model
def test_cached_and_online_training_give_the_same_losses_within_noise(tiny, tmp_path):
    online, l_on = _train(tiny, tmp_path / "online", "--random_flip")
    cached, l_ca = _train(tiny, tmp_path / "cached", "--random_flip", "--cache_latents", "--cache_dir",
                          tmp_path / "cache")
    assert online["cache"] is None and cached["cache"]["hit"] is False
    assert len(l_on) == len(l_ca) == TRAIN_STEPS
    # Same seed, data order, flips, captions and weights; the two paths draw their noise differently (the VAE
    # hands back channels_last latents online, so randn_like fills them in another order), so per-step losses
    # differ by the noise/timestep sampling alone. Paired differences cancel the shared downward trend; under
    # "same model, same data" their mean is 0 with standard error sd/sqrt(n): allow 3 standard errors.
    diffs = [a - b for a, b in zip(l_on, l_ca)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    tol = 3 * sd / math.sqrt(len(diffs))
    assert abs(mean) <= tol, f"online {statistics.fmean(l_on):.4f} vs cached {statistics.fmean(l_ca):.4f}: " \
                             f"mean paired difference {mean:+.4f} > 3 s.e. = {tol:.4f}"
    assert tol < 0.05 * statistics.fmean(l_on)  # the test has teeth: noise is a few % of the loss
    for losses in (l_on, l_ca):  # both actually learn
        assert statistics.fmean(losses[-5:]) < statistics.fmean(losses[:5])


# ------------------------------------------------------------------------------ (c) cache key and contents
def test_latent_cache_is_rebuilt_when_model_resolution_or_flip_change_and_reused_otherwise(tiny, tmp_path):
    from diffusers import AutoencoderKL

    from diffusers_npu.data.cache import LatentCache
    from diffusers_npu.data.dataset import image_transform, sample_rng

    cache = ["--cache_latents", "--cache_dir", tmp_path / "cache"]

    def cached_run(name, *extra, model=None):
        summary, _ = _train(tiny, tmp_path / name, *cache, *extra, model=model, steps=1)
        return summary["cache"]

    first = cached_run("a")
    assert first["hit"] is False
    again = cached_run("b")
    assert again == {"folder": first["folder"], "hit": True}  # same model, data, resolution, flip: reused

    res16 = cached_run("c", "--resolution", "16")
    assert res16["hit"] is False and res16["folder"] != first["folder"]
    assert LatentCache(res16["folder"]).stacked_moments().shape[-1] == 8  # 16 px through the f=2 VAE

    flip = cached_run("d", "--random_flip")
    assert flip["hit"] is False and flip["folder"] not in (first["folder"], res16["folder"])
    plain_m, flip_m = LatentCache(first["folder"]).stacked_moments(), LatentCache(flip["folder"]).stacked_moments()
    assert tuple(plain_m.shape) == (16, 1, 8, 16, 16)  # rows, orientations, mean+std channels, h, w
    assert tuple(flip_m.shape) == (16, 2, 8, 16, 16)
    torch.testing.assert_close(flip_m[:, 0], plain_m[:, 0])
    vae = AutoencoderKL.from_pretrained(tiny["model"], subfolder="vae").eval()
    px = image_transform(tiny["images"][3].convert("RGB"), 32, True, True, sample_rng(0, 0, 0))
    with torch.no_grad():
        dist = vae.encode(px[None]).latent_dist
    torch.testing.assert_close(flip_m[3, 1], torch.cat([dist.mean, dist.std], dim=1)[0], atol=1e-5, rtol=1e-4)

    # Another model folder, then the same folder with new VAE weights written in place (same file sizes, same
    # second): each gets its own cache.
    other = str(tmp_path / "model-b")
    shutil.copytree(tiny["model"], other)
    other_first = cached_run("e", model=other)
    assert other_first["hit"] is False and other_first["folder"] != first["folder"]
    vae_b = AutoencoderKL.from_pretrained(other, subfolder="vae")
    with torch.no_grad():
        for p in vae_b.parameters():
            p.mul_(0.9)
    vae_b.save_pretrained(os.path.join(other, "vae"))
    rewritten = cached_run("f", model=other)
    assert rewritten["hit"] is False and rewritten["folder"] != other_first["folder"]

    assert cached_run("g") == {"folder": first["folder"], "hit": True}  # the original settings: still reused
