"""The main job: text-to-image training on the shared Trainer (issue #3).

Most tests train 2-4 steps of the embedded digits model in-process (``run(TextToImageTask, argv)``); the few
that check exit codes and messages run the example script as a subprocess, as a user would.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_npu.train import run
from diffusers_npu.train.tasks.text_to_image import TextToImageTask

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "text_to_image",
                      "train_text_to_image.py")
QUIET = ["--report_to", "none", "--disable_progress_bar", "--no-learning_check"]


def train(tmp_path, *extra, name="out", steps=2, batch=4):
    out = str(tmp_path / name)
    argv = ["--output_dir", out, "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--checkpointing_steps", "1000", *QUIET, *map(str, extra)]
    return out, run(TextToImageTask, argv)


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SCRIPT, *QUIET, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def unet_state(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------------------------------- data sources

def _small_rows(embedded_paths, n=12):
    from datasets import load_dataset

    ds = load_dataset(embedded_paths["dataset"], split="train")
    return ds.select(range(n))


def test_pokemon_parquet_layout_is_what_we_write(embedded_paths):
    root = embedded_paths["dataset"]
    assert os.path.isfile(os.path.join(root, "data", "train-0001.parquet"))
    assert os.path.isfile(os.path.join(root, "dataset_infos.json"))
    from datasets import load_dataset

    ds = load_dataset(root, split="train")
    assert len(ds) == 1797
    words = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    for row in ds.select(range(30)):
        prefix, word = row["text"].rsplit(" ", 1)
        assert prefix == "a handwritten digit" and word in words
        assert ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][row["label"]] == word
        assert row["image"].size == (16, 16)


@pytest.mark.parametrize("kind", ["save_to_disk", "imagefolder", "parquet_file", "list_captions"])
def test_each_data_source_format_trains(kind, tmp_path, embedded_paths):
    rows = _small_rows(embedded_paths)
    src = tmp_path / "src"
    if kind == "save_to_disk":
        rows.save_to_disk(str(src))
        flags = ["--local_data_dir", src]
    elif kind == "imagefolder":
        src.mkdir()
        with open(src / "metadata.jsonl", "w") as f:
            for i, r in enumerate(rows):
                r["image"].save(src / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "text": r["text"]}) + "\n")
        flags = ["--train_data_dir", src]
    elif kind == "parquet_file":
        src.mkdir()
        rows.to_parquet(str(src / "rows.parquet"))
        flags = ["--dataset_name", src / "rows.parquet"]
    else:
        rows = rows.map(lambda r: {"text": [r["text"], r["text"].upper()]})
        rows.save_to_disk(str(src))
        flags = ["--local_data_dir", src]
    from diffusers_npu.data.sources import load_source

    kw = {"save_to_disk": "local_data_dir", "list_captions": "local_data_dir", "imagefolder": "train_data_dir",
          "parquet_file": "dataset_name"}[kind]
    loaded = load_source(**{kw: str(flags[1])})
    assert len(loaded) == 12 and "image" in loaded.column_names
    out, summary = train(tmp_path, *flags, steps=2, batch=4)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert os.path.isfile(os.path.join(out, "model_index.json"))


def test_list_caption_choice_is_deterministic_and_uses_all_options():
    from diffusers_npu.data.dataset import choose_caption, sample_rng

    picks = {choose_caption(["a", "b", "c"], sample_rng(0, e, 7, "caption"), "x") for e in range(40)}
    assert picks == {"a", "b", "c"}
    assert choose_caption(["a", "b"], sample_rng(0, 3, 1, "caption"), "x") == \
        choose_caption(["a", "b"], sample_rng(0, 3, 1, "caption"), "x")
    from diffusers_npu.data.sources import DataError

    with pytest.raises(DataError, match="row 5"):
        choose_caption(12, sample_rng(0, 0, 5), "row 5")


# --------------------------------------------------------------------------------- original flags work

def _trainer_for(tmp_path, *flags):
    """Build (not run) a Trainer with the given flags, to inspect what the flags configured."""
    from diffusers_npu.train import build_parser, finalize_args
    from diffusers_npu.train.args import parse_with_config
    from diffusers_npu.train.loop import Trainer

    args = parse_with_config(build_parser(TextToImageTask), ["--output_dir", str(tmp_path / "o"),
                                                             "--train_batch_size", "4", *QUIET, *map(str, flags)])
    finalize_args(args, TextToImageTask)
    t = Trainer(args, TextToImageTask(args))
    t.setup()
    t.build()
    return t


def test_optimizer_flags_pick_the_optimizer(tmp_path):
    from diffusers_npu.optim import MegatronAdamW

    assert isinstance(_trainer_for(tmp_path, "--use_megatron_npu_adamW").optimizer, MegatronAdamW)
    t = _trainer_for(tmp_path, "--use_npu_fuse_adamW")
    assert t.args.optimizer == "fused_adamw"
    assert isinstance(t.optimizer, torch.optim.AdamW) and t.optimizer.defaults.get("fused")
    t = _trainer_for(tmp_path)
    assert t.args.optimizer == "adamw" and not t.optimizer.defaults.get("fused")


def test_flash_attention_flag_sets_processors(tmp_path):
    from diffusers_npu.attention import attention_mode_summary

    flash = attention_mode_summary(_trainer_for(tmp_path, "--enable_npu_flash_attention").task.unet)
    assert set(flash) == {"FlashAttnProcessor"}
    upcast = attention_mode_summary(_trainer_for(tmp_path, "--attention", "upcast").task.unet)
    assert set(upcast) == {"UpcastAttnProcessor"}


def test_pin_memory_and_persistent_workers_reach_the_dataloader(tmp_path):
    t = _trainer_for(tmp_path, "--enable_pin_memory", "--enable_persistent_workers", "--dataloader_num_workers",
                     "1")
    dl = t._loader(0)
    assert dl.pin_memory is True and dl.persistent_workers is True and dl.num_workers == 1
    dl = _trainer_for(tmp_path, "--dataloader_num_workers", "1")._loader(0)
    assert dl.pin_memory is False and dl.persistent_workers is False


def test_clip_grad_norm_fused_flag_clips_every_step(tmp_path, monkeypatch):
    import diffusers_npu.optim as optim

    seen = []
    real = optim.clip_grad_norm

    def spy(*a, **k):
        seen.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(optim, "clip_grad_norm", spy)
    train(tmp_path, "--use_npu_fuse_adamW", "--use_clip_grad_norm_fused", steps=2)
    assert seen == [1.0, 1.0]
    r = run_script("--use_clip_grad_norm_fused", "--output_dir", tmp_path / "x", "--max_train_steps", 1)
    assert r.returncode == 2 and "--use_clip_grad_norm_fused needs the fused optimizer" in r.stderr


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_mixed_precision_modes_train(tmp_path, precision):
    out, summary = train(tmp_path, "--mixed_precision", precision, steps=2)
    assert summary["config"]["mixed_precision"] == precision
    assert np.isfinite(summary["final_loss"])
    w = unet_state(out)
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay fp32 in the saved pipeline


def test_fp16_uses_a_grad_scaler_and_autocast(tmp_path):
    t = _trainer_for(tmp_path, "--mixed_precision", "fp16")
    assert t.scaler is not None and t.scaler.is_enabled()
    with t._autocast():
        y = t.task.unet.conv_in(torch.randn(1, 4, 8, 8))
    assert y.dtype == torch.float16
    assert _trainer_for(tmp_path, "--mixed_precision", "no").scaler is None


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, monkeypatch):
    """2 micro-batches of 4 give the same update as one batch of 8 (same samples, same noise)."""

    def deterministic_loss(self, batch, generator=None):
        mom = self.vae.encode(batch["pixel_values"]).latent_dist.mean * self.vae.config.scaling_factor
        idx = batch["index"].tolist()
        noise = torch.stack([torch.randn(mom.shape[1:], generator=torch.Generator().manual_seed(i)) for i in idx])
        t = torch.tensor([(i * 37) % 1000 for i in idx])
        noisy = self.noise_scheduler.add_noise(mom, noise, t)
        states = self.text_encoder(batch["input_ids"])[0]
        pred = self.unet(noisy, t, states).sample
        return torch.nn.functional.mse_loss(pred, noise), {}

    monkeypatch.setattr(TextToImageTask, "compute_loss", deterministic_loss)
    # A huge epsilon makes AdamW's first update proportional to the gradient (lr*(1-b1)*g/eps) instead of
    # ~lr*sign(g), so comparing weights compares gradients.
    common = ["--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0", "--lr_warmup_steps", "0"]
    a, _ = train(tmp_path, *common, "--gradient_accumulation_steps", "2", name="acc", steps=1, batch=4)
    b, _ = train(tmp_path, *common, name="big", steps=1, batch=8)
    c, _ = train(tmp_path, *common, name="small", steps=1, batch=4)
    base = unet_state(_init_folder())
    wa, wb, wc = unet_state(a), unet_state(b), unet_state(c)
    da = torch.cat([(wa[k] - base[k]).flatten() for k in base])
    db = torch.cat([(wb[k] - base[k]).flatten() for k in base])
    dc = torch.cat([(wc[k] - base[k]).flatten() for k in base])
    assert db.norm() > 0
    # Float summation order differs (one mean of 8 vs two means of 4), so compare relative to the update size.
    assert (da - db).norm() / db.norm() < 1e-4
    assert (dc - db).norm() / db.norm() > 1e-2  # a genuinely different batch is told apart


def _init_folder():
    from diffusers_npu import embedded

    return embedded.prepare(progress=False)["model"]


# ---------------------------------------------------------------------------------- checkpoints & outputs

def test_checkpoint_resume_latest_and_pruning(tmp_path):
    out, _ = train(tmp_path, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", steps=3)
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert all(os.path.isfile(os.path.join(out, n, "COMPLETE")) for n in names)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    _, summary = train(tmp_path, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
                       "--resume_from_checkpoint", "latest", steps=5)
    assert summary["steps"] == 5
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-4", "checkpoint-5"]
    history = json.load(open(os.path.join(out, "checkpoint-5", "train_state.json")))["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]  # resumed at 3, no step repeated or lost


def test_max_train_samples_and_epochs_set_the_step_count(tmp_path):
    # 8 samples, batch 4 -> 2 steps per epoch; 3 epochs -> 6 steps.
    out = str(tmp_path / "o")
    summary = run(TextToImageTask, ["--output_dir", out, "--max_train_samples", "8", "--num_train_epochs", "3",
                                    "--train_batch_size", "4", *QUIET])
    assert summary["steps"] == 6


def test_dataset_config_name_is_passed_to_load_dataset(tmp_path, embedded_paths):
    out, summary = train(tmp_path, "--dataset_name", embedded_paths["dataset"], "--dataset_config_name", "default",
                         steps=1)
    assert summary["steps"] == 1
    r = run_script("--dataset_name", embedded_paths["dataset"], "--dataset_config_name", "no_such_config",
                   "--output_dir", tmp_path / "x", "--max_train_steps", 1)
    assert r.returncode == 2 and "no_such_config" in r.stderr


def test_saved_pipeline_loads_and_generates_and_outputs_exist(tmp_path):
    out, summary = train(tmp_path, "--validation_prompts", "a handwritten digit one", "--num_validation_images",
                         "2", "--report_to", "tensorboard", steps=2)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.safety_checker is None
    img = pipe("a handwritten digit three", num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (16, 16)
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "validation", "final.png"))
    assert os.path.isfile(os.path.join(out, "train_curves.png"))
    events = [f for r, _, fs in os.walk(os.path.join(out, "logs")) for f in fs if "tfevents" in f]
    assert events
    s = json.load(open(os.path.join(out, "train_summary.json")))
    for key in ("images_per_sec", "final_loss", "e2e_seconds", "peak_memory_bytes", "config"):
        assert key in s
    assert s["images_per_sec"] > 0 and s["config"]["train_batch_size"] == 4


def test_config_file_sets_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_batch_size: 2\nlearning_rate: 3.0e-4\nmax_train_steps: 1\n")
    out = str(tmp_path / "o")
    summary = run(TextToImageTask, ["--config", str(cfg), "--output_dir", out, "--learning_rate", "5e-4", *QUIET])
    assert summary["config"]["train_batch_size"] == 2
    assert summary["config"]["learning_rate"] == 5e-4
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_batch_sise: 2\n")
    r = run_script("--config", bad, "--output_dir", tmp_path / "b")
    assert r.returncode != 0 and "train_batch_sise" in r.stderr


# ------------------------------------------------------------------------------------------- bad input

def test_bad_column_names_existing_columns(tmp_path):
    r = run_script("--caption_column", "caption_xx", "--output_dir", tmp_path / "o", "--max_train_steps", 1)
    assert r.returncode == 2
    assert "--caption_column" in r.stderr and "caption_xx" in r.stderr and "image, text, label" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "model_index.json")


def test_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_script("--pretrained_model_name_or_path", missing, "--output_dir", tmp_path / "o")
    assert r.returncode == 2 and str(missing) in r.stderr and "does not exist" in r.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    r = run_script("--pretrained_model_name_or_path", tmp_path / "half", "--output_dir", tmp_path / "o")
    assert r.returncode == 2 and "has no 'unet' folder" in r.stderr


def test_corrupt_image_fails_with_its_row_or_is_skipped(tmp_path, embedded_paths):
    rows = _small_rows(embedded_paths, n=8)
    src = tmp_path / "imgs"
    src.mkdir()
    with open(src / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            r["image"].save(src / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": r["text"]}) + "\n")
    (src / "3.png").write_bytes(b"this is not a png")
    r = run_script("--train_data_dir", src, "--output_dir", tmp_path / "o", "--max_train_steps", 2,
                   "--train_batch_size", 8)
    assert r.returncode != 0
    assert "3.png" in r.stderr or "row 3" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o" / "model_index.json")
    out = str(tmp_path / "ok")
    summary = run(TextToImageTask, ["--train_data_dir", str(src), "--output_dir", out, "--max_train_steps", "2",
                                    "--train_batch_size", "8", "--skip_bad_images", *QUIET])
    assert summary["bad_images_skipped"] >= 1


def test_resolution_must_be_divisible_by_8(tmp_path):
    r = run_script("--resolution", 20, "--output_dir", tmp_path / "o")
    assert r.returncode == 2 and "--resolution must be divisible by 8" in r.stderr


def test_help_lists_every_original_flag():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for flag in ("--max_train_steps", "--pretrained_model_name_or_path", "--dataset_name", "--local_data_dir",
                 "--dataset_config_name", "--train_data_dir", "--train_batch_size", "--image_column",
                 "--caption_column", "--max_train_samples", "--validation_prompts", "--output_dir",
                 "--resolution", "--num_train_epochs", "--gradient_accumulation_steps", "--mixed_precision",
                 "--use_megatron_npu_adamW", "--use_npu_fuse_adamW", "--use_clip_grad_norm_fused",
                 "--enable_npu_flash_attention", "--enable_pin_memory", "--enable_persistent_workers",
                 "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--seed", "--center_crop",
                 "--random_flip", "--gradient_checkpointing", "--use_ema", "--snr_gamma", "--noise_offset",
                 "--prediction_type", "--max_grad_norm", "--dataloader_num_workers", "--checkpointing_steps",
                 "--checkpoints_total_limit", "--resume_from_checkpoint", "--validation_steps", "--report_to",
                 "--allow_tf32", "--attention", "--config", "--cache_latents", "--compile"):
        assert flag in r.stdout, flag
