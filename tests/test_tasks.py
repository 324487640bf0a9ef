"""DreamBooth, textual inversion, ControlNet and LoRA on the shared engine: each trains a few steps of the
embedded digits model in-process, resumes, and its output loads into the matching diffusers pipeline."""
import json
import os

import numpy as np
import pytest
import torch

from trainkit import argv, main_rc, same_weights, train, weights


def sd_pipeline(model, **kw):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, **kw):
    out = pipe(prompt, num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator("cpu").manual_seed(0), **kw).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    return out


# ------------------------------------------------------------------------------------------------ DreamBooth
def test_dreambooth_prior_preservation_logs_both_losses_and_reuses_class_images(tmp_path, capsys):
    out = tmp_path / "db"
    flags = ["--with_prior_preservation", "--num_class_images", "3", "--sample_batch_size", "3",
             "--class_inference_steps", "2"]
    rc, stdout, err = main_rc("dreambooth", argv(out, 2, *flags, batch=1, ckpt=2), capsys)
    assert rc == 0, err
    assert "instance_loss=" in stdout and "prior_loss=" in stdout
    assert "generating class images" in err  # the progress bar's label (tqdm writes to stderr)
    s = json.load(open(out / "train_summary.json"))
    assert (s["class_images"], s["class_images_generated"], s["instance_images"]) == (3, 3, 5)
    assert sorted(os.listdir(out / "class_images")) == [f"class-{i:05d}.png" for i in range(3)]
    s = train("dreambooth", out, *flags, "--resume_from_checkpoint", "latest", steps=3, batch=1)
    assert s["class_images_generated"] == 0 and s["steps"] == 3  # reused, and resumed at 2
    generate(sd_pipeline(out), "a photo of sks digit")


def test_dreambooth_text_encoder_training_writes_it_in_checkpoints_and_pipeline(tmp_path, embedded_paths):
    out = tmp_path / "te"
    train("dreambooth", out, "--train_text_encoder", "--learning_rate", "1e-3", steps=2, batch=1, ckpt=2)
    from transformers import CLIPTextModel

    ckpt_te = CLIPTextModel.from_pretrained(str(out / "checkpoint-2" / "text_encoder"))
    final_te = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    base_te = CLIPTextModel.from_pretrained(embedded_paths["model"], subfolder="text_encoder")
    k = next(n for n in final_te.state_dict() if n.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(ckpt_te.state_dict()[k], final_te.state_dict()[k])
    assert not torch.equal(final_te.state_dict()[k], base_te.state_dict()[k])


def test_dreambooth_refuses_pixel_space_models_by_name(tmp_path, capsys, embedded_paths):
    import shutil

    model = tmp_path / "pixel"
    shutil.copytree(embedded_paths["model"], model)
    shutil.rmtree(model / "vae")
    index = json.load(open(model / "model_index.json"))
    index.pop("vae")
    json.dump(index, open(model / "model_index.json", "w"))
    rc, _, err = main_rc("dreambooth", argv(tmp_path / "o", 1, "--pretrained_model_name_or_path", model), capsys)
    assert rc == 2 and "pixel-space models" in err and "not supported" in err


def test_dreambooth_flags_that_cannot_apply_say_why(tmp_path, capsys):
    rc, _, err = main_rc("dreambooth", argv(tmp_path / "o", 1, "--validation_images", "a.png"), capsys)
    assert rc == 2 and "--validation_images" in err and "DeepFloyd IF" in err
    rc, _, err = main_rc("dreambooth", argv(tmp_path / "o", 1, "--class_labels_conditioning", "timesteps"), capsys)
    assert rc == 2 and "no class embedding" in err
    assert not os.path.exists(tmp_path / "o")


# -------------------------------------------------------------------------------------------------- LoRA
def test_text_to_image_lora_trains_only_adapters_resumes_and_changes_the_pipeline(tmp_path, embedded_paths):
    out = tmp_path / "lora"
    train("text_to_image", out, "--use_lora", "--rank", "4", "--learning_rate", "1e-2", steps=2, ckpt=2)
    ck = out / "checkpoint-2"
    assert os.path.isfile(ck / "pytorch_lora_weights.safetensors") and not os.path.exists(ck / "unet")
    s = train("text_to_image", out, "--use_lora", "--rank", "4", "--learning_rate", "1e-2",
              "--resume_from_checkpoint", "latest", steps=3)
    assert s["steps"] == 3 and s["output"]["files"] == ["pytorch_lora_weights.safetensors"]
    assert sorted(os.listdir(out)) == sorted(["checkpoint-2", "pytorch_lora_weights.safetensors", "training_info.json",
                                              "train_summary.json", "train_curves.png"])
    size = os.path.getsize(out / "pytorch_lora_weights.safetensors")
    assert size < os.path.getsize(os.path.join(embedded_paths["model"], "unet",
                                               "diffusion_pytorch_model.safetensors")) / 10
    pipe = sd_pipeline(embedded_paths["model"])
    before = generate(pipe, "a handwritten digit one")
    pipe.load_lora_weights(str(out))
    assert np.abs(generate(pipe, "a handwritten digit one") - before).max() > 1e-4
    info = json.load(open(out / "training_info.json"))
    assert info["kind"] == "lora" and info["base_model"] == os.path.abspath(embedded_paths["model"])


def test_lora_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    flags = ["--use_lora", "--learning_rate", "1e-2", "--lora_dropout", "0.0"]
    train("text_to_image", tmp_path / "a", *flags, steps=3)
    train("text_to_image", tmp_path / "b", *flags, steps=2, ckpt=2)
    train("text_to_image", tmp_path / "b", *flags, "--resume_from_checkpoint", "latest", steps=3)
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert same_weights(a, b)


def test_dreambooth_lora_with_text_encoder_loads(tmp_path, embedded_paths):
    out = tmp_path / "dbl"
    s = train("dreambooth", out, "--use_lora", "--train_text_encoder", steps=2, batch=1)
    assert s["config"]["learning_rate"] == 5e-4  # upstream train_dreambooth_lora.py's default
    pipe = sd_pipeline(embedded_paths["model"])
    before = generate(pipe, "a photo of sks digit")
    pipe.load_lora_weights(str(out))
    assert np.abs(generate(pipe, "a photo of sks digit") - before).max() > 0


# -------------------------------------------------------------------------------------- textual inversion
def test_textual_inversion_changes_only_the_new_rows_and_loads(tmp_path, embedded_paths):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    out = tmp_path / "ti"
    train("textual_inversion", out, "--num_vectors", "2", "--learning_rate", "5e-2", "--save_steps", "1",
          "--save_as_full_pipeline", steps=2, batch=2)
    emb = load_file(out / "learned_embeds.safetensors")["<digit-x>"]
    assert emb.shape == (2, 64)
    assert os.path.isfile(out / "learned_embeds-steps-1.safetensors")  # --save_steps
    te = CLIPTextModel.from_pretrained(str(out), subfolder="text_encoder")
    base = CLIPTextModel.from_pretrained(embedded_paths["model"], subfolder="text_encoder")
    new_w, old_w = te.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert torch.equal(new_w[:old_w.shape[0]], old_w)  # every existing row bit-identical (weight decay too)
    assert torch.equal(new_w[old_w.shape[0]:], emb)
    pipe = sd_pipeline(embedded_paths["model"])
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    generate(pipe, "a photo of <digit-x>")
    full = sd_pipeline(out)  # --save_as_full_pipeline
    assert "<digit-x>" in full.tokenizer.get_vocab() and "<digit-x>_1" in full.tokenizer.get_vocab()


def test_textual_inversion_style_templates_and_resume(tmp_path):
    from diffusers_npu.train.tasks.textual_inversion import TEMPLATES

    assert all("style" in t for t in TEMPLATES["style"]) and not any("style" in t for t in TEMPLATES["object"])
    out = tmp_path / "st"
    train("textual_inversion", out, "--learnable_property", "style", steps=2, batch=2, ckpt=2)
    s = train("textual_inversion", out, "--learnable_property", "style", "--resume_from_checkpoint", "latest",
              steps=3, batch=2)
    assert s["steps"] == 3 and s["output"]["kind"] == "textual_inversion"


def test_textual_inversion_sees_style_captions(tmp_path, monkeypatch):
    from diffusers_npu.train.tasks import textual_inversion as ti

    seen = []
    real = ti.TextualInversionTask.caption_ids

    def spy(self):
        ids = real(self)
        seen.extend(self.tokenizer.decode(i, skip_special_tokens=True) for i in ids)
        return ids

    monkeypatch.setattr(ti.TextualInversionTask, "caption_ids", spy)
    train("textual_inversion", tmp_path / "o", "--learnable_property", "style", steps=1, batch=2)
    assert seen and all("style" in c for c in seen)


# ----------------------------------------------------------------------------------------------- ControlNet
def test_controlnet_trains_resumes_and_steers_the_pipeline(tmp_path, embedded_paths):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    out = tmp_path / "cn"
    train("controlnet", out, "--learning_rate", "1e-2", steps=2, ckpt=2)
    s = train("controlnet", out, "--learning_rate", "1e-2", "--resume_from_checkpoint", "latest", steps=3)
    assert s["steps"] == 3 and s["conditioning"] == "derived (sobel)"
    cn = ControlNetModel.from_pretrained(str(out))
    # The full path: diffusers' from_pretrained(root, subfolder=...) prefers weights found at the root, and a
    # ControlNet output folder has its final weights there.
    at_2 = ControlNetModel.from_pretrained(str(out / "checkpoint-2" / "controlnet"))
    assert not same_weights(cn.state_dict(), at_2.state_dict())  # trained on after the checkpoint
    pipe = StableDiffusionControlNetPipeline.from_pretrained(embedded_paths["model"], controlnet=cn,
                                                             safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cond = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    generate(pipe, "a handwritten digit one", image=cond)


def test_controlnet_from_an_existing_controlnet_starts_from_its_weights(tmp_path, monkeypatch):
    from diffusers import ControlNetModel

    first = tmp_path / "first"
    train("controlnet", first, "--learning_rate", "1e-2", steps=1)
    seen = {}
    from diffusers_npu.train.tasks import controlnet as cnt

    real = cnt.ControlNetTask.build_module

    def spy(self):
        module = real(self)
        seen["w"] = self.controlnet.state_dict()["conv_in.weight"].clone()
        return module

    monkeypatch.setattr(cnt.ControlNetTask, "build_module", spy)
    train("controlnet", tmp_path / "second", "--controlnet_model_name_or_path", first, steps=1)
    assert torch.equal(seen["w"], ControlNetModel.from_pretrained(str(first)).state_dict()["conv_in.weight"])


def test_controlnet_corrupt_conditioning_image_is_named_or_skipped(tmp_path, capsys, embedded_paths):
    from datasets import Dataset, Image as DImage, load_dataset

    rows = load_dataset(embedded_paths["dataset"], split="train").select(range(8))
    data = {"image": [r["image"] for r in rows], "text": [r["text"] for r in rows],
            "conditioning_image": [r["image"] for r in rows]}
    ds = Dataset.from_dict(data).cast_column("image", DImage()).cast_column("conditioning_image", DImage())
    ds = ds.cast_column("conditioning_image", DImage(decode=False))

    def corrupt(row, i):
        if i == 3:
            row["conditioning_image"] = {"bytes": b"not an image", "path": "cond-3.png"}
        return row

    ds.map(corrupt, with_indices=True).save_to_disk(str(tmp_path / "d"))
    rc, _, err = main_rc("controlnet", argv(tmp_path / "o", 2, "--local_data_dir", tmp_path / "d", batch=8), capsys)
    assert rc == 2 and "conditioning_image" in err and "cond-3.png" in err, err
    s = train("controlnet", tmp_path / "ok", "--local_data_dir", tmp_path / "d", "--skip_bad_images", steps=1, batch=4)
    assert s["conditioning"] == "conditioning_image"


def test_one_controlnet_validation_prompt_goes_with_every_validation_image():
    """As upstream's ControlNet scripts: one --validation_prompt and N --validation_image make N pairs."""
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults
    from diffusers_npu.train.registry import find_task

    for task in ("controlnet", "controlnet_flux"):
        cls = find_task(task)
        args = resolve_defaults(parse_args(cls, ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d",
                                                 "--validation_prompt", "a circle", "--validation_image", "x.png",
                                                 "y.png"]), DeviceInfo("cpu"), None, cls)
        cls(args).validate_args()
        assert args.validation_prompts == ["a circle", "a circle"], task


def test_task_flag_errors_are_named(tmp_path, capsys):
    for task, flags, message in (
            ("textual_inversion", ["--initializer_token", "two words"], "--initializer_token"),
            ("textual_inversion", ["--placeholder_token", "digit"], "already a token"),
            ("textual_inversion", ["--use_ema"], "--use_ema is not available for textual_inversion"),
            ("controlnet", ["--validation_prompts", "a", "b", "--validation_image", "x", "y", "z"],
             "--validation_image: give 1 or 2"),
            ("dreambooth", ["--use_ema", "--train_text_encoder"], "--use_ema averages the UNet only")):
        rc, _, err = main_rc(task, argv(tmp_path / task, 1, *flags, batch=1), capsys)
        assert rc == 2 and message in err, (task, err)
