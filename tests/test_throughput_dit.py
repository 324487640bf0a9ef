"""The diffusion-transformer rows of the training harness and of ``bench/gpu_run.sh`` (issue #21 item 9).

* ``DRY_RUN=1 bash bench/gpu_run.sh`` prints the real (GPU) sequence; each DiT row's harness command is resolved
  here as the harness resolves it and its training command parsed with the DreamBooth script's own parser: the
  task (full / LoRA script), resolution, batch, bf16, gradient checkpointing and the reduced FLUX depth the row
  promises -- nothing runs;
* one DiT row end to end on CPU (``flux-tiny``, the smoke's FLUX row): the harness builds the pipeline folder,
  times ``Trainer.train_step`` of ``train_dreambooth_flux.py``'s Trainer, counts the step's FLOPs and names the
  script in its output. No timing is asserted;
* a reduced-depth row's FLOPs are its own model's and its full-depth figure is a labelled projection.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess

import pytest


@pytest.fixture(scope="module")
def gpu_rows(repo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "WORK": str(out / "work"), "FLUX_LORA": "1"}
    proc = subprocess.run(["bash", os.path.join(repo_root, "bench", "gpu_run.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {}
    for m in re.finditer(r"^== (\S+) \((\d+) s\): python3 bench/train_throughput.py (.*)$", proc.stdout, re.M):
        rows[m.group(1)] = (int(m.group(2)), shlex.split(m.group(3)))
    return rows


def _resolved(argv):
    """What the harness would run for ``argv`` here: its resolved args and, per mode, the task and the parsed
    training command (the model and data folders are placeholders)."""
    from diffusers_npu.benchmark.commands import mode_spec, parsed_args, trainer_argv
    from diffusers_npu.benchmark.train import build_parser, resolve_args
    from diffusers_npu.train import task_class

    a = resolve_args(build_parser().parse_args(argv + ["--device", "cpu"]))
    fx = {"model": "MODEL", "data": "DATA", "cache": "CACHE"}
    modes = {}
    for name in a.mode_list:
        spec = mode_spec(a, name)
        task = task_class(spec["task"])
        modes[name] = (task, parsed_args(task, trainer_argv(a, fx, spec, task, "OUT", None)))
    return a, modes


def test_gpu_run_has_the_dit_rows_with_the_promised_settings(gpu_rows):
    assert list(gpu_rows)[1:5] == ["train_sd3-medium", "train_sd3-medium_lora", "train_flux1-dev",
                                   "train_flux1-dev_lora"]
    expected = {  # row: (task, script, resolution, batch, gradient checkpointing)
        "train_sd3-medium": ("dreambooth_sd3", "train_dreambooth_sd3.py", 1024, 4, True),
        "train_sd3-medium_lora": ("dreambooth_lora_sd3", "train_dreambooth_lora_sd3.py", 1024, 8, False),
        "train_flux1-dev": ("dreambooth_flux", "train_dreambooth_flux.py", 256, 16, True),
        "train_flux1-dev_lora": ("dreambooth_lora_flux", "train_dreambooth_lora_flux.py", 256, 16, False),
    }
    for row, (task_name, script, res, batch, ckpt) in expected.items():
        limit, argv = gpu_rows[row]
        assert limit >= 30, (row, limit)
        a, modes = _resolved(argv)
        assert len(modes) == 1, (row, a.mode_list)
        task, args = next(iter(modes.values()))
        assert task.name == task_name and task.example == f"examples/dreambooth/{script}"
        assert (args.resolution, args.train_batch_size, args.mixed_precision) == (res, batch, "bf16"), row
        assert bool(args.gradient_checkpointing) is ckpt, row
        assert args.instance_data_dir == "DATA" and args.pretrained_model_name_or_path == "MODEL"
    # FLUX full fine-tuning runs at reduced depth on one device (all of it needs ~190 GB); its LoRA at full depth
    flux, _ = _resolved(gpu_rows["train_flux1-dev"][1])
    assert flux.dit.depth == (10, 19) and flux.dit.full_depth == (19, 38)
    assert "10 of 19 double-stream + 19 of 38 single-stream" in flux.dit.describe_depth()
    assert _resolved(gpu_rows["train_flux1-dev_lora"][1])[0].dit.depth is None
    # each DiT row may use what the earlier ones left, never more than DIT_SHARE (330 s) in all
    limits = [gpu_rows[r][0] for r in expected]
    assert limits == sorted(limits) and limits[-1] <= 330


def test_one_dit_row_runs_end_to_end_on_cpu(tmp_path):
    from diffusers_npu.benchmark.train import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(["--preset", "flux-tiny", "--device", "cpu", "--modes", "online,reference", "--steps", "2",
                       "--warmup", "1", "--batch_size", "2", "--work_dir", str(tmp_path / "work")])
    online, reference = result["modes"]
    assert "error" not in online, online
    assert online["figure"] == "Trainer.train_step" and online["task"] == "dreambooth_flux"
    assert online["command"].startswith("OMP_NUM_THREADS=1 python examples/dreambooth/train_dreambooth_flux.py ")
    assert "--instance_data_dir" in online["argv"] and online["images_per_sec"] > 0
    assert online["resolved"]["max_sequence_length"] == 77  # upstream train_dreambooth_flux.py's default
    # FLOPs: the transformer forward + backward and the VAE encoder (in the step: latents not cached)
    counts = result["flops_per_image"]["16px-77tok"]
    assert online["flops_per_image"] == counts["full_fwd_bwd"] + counts["vae_encoder_fwd"] > 0
    assert "reference" in reference["skipped"]
    printed = out.getvalue()
    assert "online: Trainer.train_step of examples/dreambooth/train_dreambooth_flux.py" in printed
    assert "flux-tiny: diffusers' pipeline-test sizes" in printed


def test_dit_depth_is_checked_in_one_line(capsys):
    from diffusers_npu.benchmark.train import cli

    cases = [(["--preset", "flux1-dev", "--dit_depth", "20,1"], "--dit_depth 20,1: flux1-dev has 19,38 blocks"),
             (["--preset", "sd3-tiny", "--dit_depth", "1"], "--dit_depth applies to the real-size presets"),
             (["--preset", "tiny", "--dit_depth", "1"], "--dit_depth applies to the SD3 / FLUX presets")]
    for argv, message in cases:
        assert cli(argv + ["--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_reduced_depth_row_reports_its_own_flops_and_a_labelled_full_depth_projection():
    from types import SimpleNamespace

    from diffusers_npu.benchmark.dit import add_flops, bench_info, row_notes

    info = bench_info("flux1-dev", "10")  # single-stream blocks in FLUX.1's proportion: 10,20
    assert (info.depth, info.folder_name) == ((10, 20), "model-flux1-dev-d10-20")
    a = SimpleNamespace(dit=info, resolution=256, peak_tflops=1000.0)
    asked = []

    def counts(res, kind, text_len):
        asked.append((res, kind, text_len))
        return {"full_fwd_bwd": 6e12, "vae_encoder_fwd": 1e12, "full_fwd_bwd_full_depth": 12e12}

    row = {"mode": "online", "task": "dreambooth_flux", "images_per_sec": 20.0, "images_per_sec_per_device": 20.0,
           "resolved": {"resolution": 256, "max_sequence_length": 77, "cache_latents": False}}
    add_flops(a, row, counts, "full")
    assert asked == [(256, "full", 77)]
    assert row["flops_per_image"] == 7e12 and row["tflops_per_device"] == 140.0 and row["pct_of_peak"] == 14.0
    assert row["projected_full_depth_images_per_sec_per_device"] == 140e12 / 13e12
    note = row_notes({"modes": [row]})[0]
    assert note.startswith("online: full depth (projected, not measured): 10.77 images/s per device")
    cached = dict(row, resolved=dict(row["resolved"], cache_latents=True))  # no VAE encoder in a cached step
    add_flops(a, cached, counts, "full")
    assert cached["flops_per_image"] == 6e12 and cached["full_depth_flops_per_image"] == 12e12
