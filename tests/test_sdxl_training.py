"""Stable Diffusion XL training (issue #12): text-to-image (full and LoRA), DreamBooth-LoRA and ControlNet on the
shared Trainer, on a tiny SDXL pipeline (presets' ``sdxl-tiny``) and the embedded digits data, in-process.

Each task runs a few steps, saves, and its output loads in the matching upstream diffusers pipeline, which
generates. The conditioning is checked against what the pipelines compute at inference (prompt embeddings)
and against the image data itself (the time ids follow the real crop, read back from the pixels).
Slow (CI): 2-process ddp / fsdp runs, and the embedded SDXL default passing the learning check.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_npu.train import main, run
from diffusers_npu.train.tasks.controlnet_sdxl import ControlNetSDXLTask
from diffusers_npu.train.tasks.dreambooth_lora_sdxl import DreamBoothLoraSDXLTask
from diffusers_npu.train.tasks.text_to_image_sdxl import TextToImageLoraSDXLTask, TextToImageSDXLTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--report_to", "none", "--disable_progress_bar", "--no-learning_check", "--lr_warmup_steps", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from diffusers_npu.presets import build_test_pipeline

    return build_test_pipeline("sdxl", str(tmp_path_factory.mktemp("tiny-sdxl") / "model"))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The embedded digits data set (parquet), written once for this module."""
    from diffusers_npu.embedded import write_digits_dataset

    return write_digits_dataset(str(tmp_path_factory.mktemp("digits") / "data"))


def base_args(model, data, out, *extra, steps=2, batch=2):
    return ["--pretrained_model_name_or_path", model, "--dataset_name", data, "--resolution", "16",
            "--max_train_samples", "32", "--output_dir", str(out), "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), "--checkpointing_steps", "2", *QUIET, *map(str, extra)]


def sdxl_pipeline(model, cls_name="StableDiffusionXLPipeline", **kw):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(model, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a handwritten digit seven", **kw):
    g = torch.Generator("cpu").manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=16, width=16, generator=g, output_type="np", **kw).images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
    return out


def recording(task_cls):
    """A subclass whose module records, per step, its (loss, metrics) and the time ids reaching the UNet."""

    class Recording(task_cls):
        records: list = []
        time_ids: list = []

        def build_module(self):
            module = super().build_module()
            unet = module.unet if "unet" in module._modules else module.frozen.unet
            forward, unet_forward = module.forward, unet.forward

            def record_forward(batch):
                loss, extra = forward(batch)
                Recording.records.append((float(loss.detach()), {k: float(v) for k, v in extra.items()}))
                return loss, extra

            def record_unet(*args, added_cond_kwargs=None, **kwargs):
                if torch.is_grad_enabled():  # training steps only (pipelines sample without gradients)
                    Recording.time_ids.append(added_cond_kwargs["time_ids"].detach().clone())
                return unet_forward(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

            module.forward, unet.forward = record_forward, record_unet
            return module

    Recording.__name__ = task_cls.__name__
    return Recording


# ------------------------------------------------------------------------------------------ conditioning

def test_prompt_embeddings_equal_what_the_sdxl_pipeline_computes(tiny_sdxl):
    """Training conditions the UNet on exactly the prompt states and pooled embedding the pipeline uses."""
    from diffusers_npu.train.sdxl import SdxlTokenize, encode_prompt

    pipe = sdxl_pipeline(tiny_sdxl)
    prompts = ["a handwritten digit seven", ""]
    want, _, want_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    tok = SdxlTokenize(pipe.tokenizer, pipe.tokenizer_2)
    ids = [torch.stack([tok(p)[key] for p in prompts]) for key in ("input_ids", "input_ids_2")]
    with torch.no_grad():
        got, pooled = encode_prompt((pipe.text_encoder, pipe.text_encoder_2), ids)
    assert got.shape == (2, pipe.tokenizer.model_max_length, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-6)


def test_timestep_bias_weights_match_a_float64_reference():
    from diffusers_npu.errors import UsageError
    from diffusers_npu.train.sdxl import timestep_weights

    def ref(boost):
        w = np.ones(1000)
        w[boost] *= 3.0
        return w / w.sum()

    cases = {("later", 0, 999, 0.25): slice(750, 1000), ("earlier", 0, 999, 0.1): slice(0, 100),
             ("range", 200, 299, 0.25): slice(200, 300)}
    for (strategy, begin, end, portion), boost in cases.items():
        got = timestep_weights(strategy, 1000, 3.0, begin, end, portion).numpy()
        np.testing.assert_allclose(got, ref(boost), rtol=1e-12)
    np.testing.assert_allclose(timestep_weights("none", 1000).numpy(), np.full(1000, 1e-3), rtol=1e-12)
    with pytest.raises(UsageError, match="--timestep_bias_multiplier must be > 0"):
        timestep_weights("later", 1000, 0.0)
    with pytest.raises(UsageError, match="--timestep_bias_begin/--timestep_bias_end"):
        timestep_weights("range", 1000, 2.0, 500, 100)


def _striped_images(folder):
    """Two images the crop must move over without resizing (their short side is the 16 px resolution): each
    pixel's red value is 5 x its column and green 5 x its row, so a crop reveals where it was taken."""
    os.makedirs(folder)
    rows = []
    for name, (h, w) in (("wide.png", (16, 48)), ("tall.png", (40, 16))):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([5 * x, 5 * y, np.zeros_like(x)], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, name))
        rows.append({"file_name": name, "text": "a handwritten digit one"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {16 * 48: (16, 48), 40 * 16: (40, 16)}


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached"])
def test_time_ids_reaching_the_unet_follow_each_samples_crop(cached, tiny_sdxl, tmp_path):
    sizes = _striped_images(str(tmp_path / "imgs"))
    task = recording(TextToImageSDXLTask)
    task.records, task.time_ids = [], []
    seen_pixels = []
    if not cached:  # the pixels the VAE encodes, to read the crop back from them
        from diffusers import AutoencoderKL

        real_encode = AutoencoderKL.encode

        def encode(self, x, *a, **k):
            seen_pixels.append(x.detach().clone())
            return real_encode(self, x, *a, **k)

        AutoencoderKL.encode = encode
    try:
        argv = ["--pretrained_model_name_or_path", tiny_sdxl, "--train_data_dir", str(tmp_path / "imgs"),
                "--resolution", "16", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "6",
                "--train_batch_size", "2", "--checkpointing_steps", "100", "--random_flip", *QUIET,
                "--cache_dir", str(tmp_path / "cache")] + (["--cache_latents"] if cached else [])
        run(task, argv)
    finally:
        if not cached:
            AutoencoderKL.encode = real_encode
    ids = torch.cat(task.time_ids)
    assert ids.shape == (12, 6) and ids.dtype == torch.float32
    for row in ids.tolist():
        oh, ow, top, left, th, tw = map(int, row)
        assert (th, tw) == (16, 16) and (oh, ow) in sizes.values()
        if cached:  # the cache holds center crops: (48 - 16) / 2 and (40 - 16) / 2
            assert (top, left) == ((0, 16) if ow == 48 else (12, 0))
    if cached:
        return
    pixels = torch.cat(seen_pixels)  # [-1, 1] -> the original image's column and row at the crop's corner
    assert pixels.shape[0] == 12
    for px, row in zip(pixels, ids.tolist()):
        oh, ow, top, left = map(int, row[:4])
        cols = ((px[0, 0] + 1) * 127.5 / 5).round().long()
        rows = ((px[1, :, 0] + 1) * 127.5 / 5).round().long()
        flipped = bool(cols[-1] < cols[0])
        # The corner is where the crop sits in the image as shown to the model (mirrored after a flip).
        assert int(cols[0]) == (ow - 1 - left if flipped else left)
        assert int(rows[0]) == top
    flips = {bool(((p[0, 0, -1] - p[0, 0, 0]) < 0).item()) for p in pixels}
    assert flips == {False, True}  # both orientations were exercised


# ---------------------------------------------------------------------------------------------- tasks

def test_text_to_image_sdxl_trains_resumes_and_loads_in_the_sdxl_pipeline(tiny_sdxl, digits, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "t2i"
    first = run(TextToImageSDXLTask, base_args(tiny_sdxl, digits, out))
    assert first["steps"] == 2 and first["output"]["kind"] == "pipeline"
    second = run(TextToImageSDXLTask, base_args(tiny_sdxl, digits, out, "--resume_from_checkpoint", "latest",
                                                steps=3))
    assert second["steps"] == 3 and second["exit_reason"] == "completed"
    # The checkpoint holds the UNet in diffusers format; the output is a full SDXL pipeline that keeps the base
    # model's scheduler and its force_zeros_for_empty_prompt.
    ckpt_unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="checkpoint-2/unet")
    assert ckpt_unet.config.addition_embed_type == "text_time"
    index = json.loads((out / "model_index.json").read_text())
    base_index = json.load(open(os.path.join(tiny_sdxl, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["scheduler"] == base_index["scheduler"]
    assert index.get("force_zeros_for_empty_prompt", True) == base_index.get("force_zeros_for_empty_prompt", True)
    pipe = sdxl_pipeline(str(out))
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, pipe.unet.state_dict()[k])]
    assert moved  # the UNet trained
    assert pipe.vae.dtype == torch.float32
    generate(pipe)
    info = json.loads((out / "training_info.json").read_text())
    assert info["task"] == "text_to_image_sdxl" and info["base_model"] == os.path.abspath(tiny_sdxl)


def test_lora_on_unet_and_both_text_encoders_changes_the_loaded_pipeline(tiny_sdxl, digits, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    summary = run(TextToImageLoraSDXLTask, base_args(tiny_sdxl, digits, out, "--train_text_encoder", "--rank", "4",
                                                     "--learning_rate", "1e-2"))
    assert summary["output"]["files"] == ["pytorch_lora_weights.safetensors"]
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert all("lora" in k for k in sd)
    for prefix in prefixes:  # every part trained: some up-projection (zero at start) moved away from zero
        ups = [v for k, v in sd.items() if k.startswith(prefix + ".") and ("lora_B" in k or ".up." in k)]
        assert ups and max(float(v.abs().max()) for v in ups) > 0
    pipe = sdxl_pipeline(tiny_sdxl)
    before = generate(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(generate(pipe) - before).max() > 1e-4
    # Resume restores the adapters exactly from the checkpoint's peft-named copy.
    again = run(TextToImageLoraSDXLTask, base_args(tiny_sdxl, digits, out, "--train_text_encoder", "--rank", "4",
                                                   "--learning_rate", "1e-2", "--resume_from_checkpoint", "latest",
                                                   steps=3))
    assert again["steps"] == 3


def test_dreambooth_lora_sdxl_with_prior_preservation(tiny_sdxl, digits, tmp_path):
    out = tmp_path / "db"
    task = recording(DreamBoothLoraSDXLTask)
    task.records, task.time_ids = [], []
    argv = base_args(tiny_sdxl, digits, out, "--with_prior_preservation", "--num_class_images", "2",
                     "--class_inference_steps", "2", "--sample_batch_size", "2", "--prior_loss_weight", "0.5",
                     "--learning_rate", "1e-2", batch=1)
    summary = run(task, argv + ["--output_kohya_format"])
    assert summary["instance_images"] == 5 and summary["class_images_generated"] == 2
    assert sorted(os.listdir(out / "class_images")) == ["class-00000.png", "class-00001.png"]
    assert len(task.records) == 2
    for loss, extra in task.records:
        assert set(extra) == {"instance_loss", "prior_loss"}
        assert loss == pytest.approx(extra["instance_loss"] + 0.5 * extra["prior_loss"], rel=1e-5)
    # instance and class samples each carry their own time ids (16 px digits: no crop)
    assert all(t.shape == (2, 6) for t in task.time_ids)
    assert torch.cat(task.time_ids).tolist()[0] == [16, 16, 0, 0, 16, 16]
    from safetensors.torch import load_file

    # the kohya copy holds the same adapters under kohya's names (plus one alpha per layer)
    ours, kohya = load_file(str(out / "pytorch_lora_weights.safetensors")), load_file(
        str(out / "pytorch_lora_weights_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert sorted(float(v.abs().sum()) for v in ours.values()) == \
        sorted(float(v.abs().sum()) for k, v in kohya.items() if not k.endswith(".alpha"))
    pipe = sdxl_pipeline(tiny_sdxl)
    before = generate(pipe, "a photo of sks digit")
    pipe.load_lora_weights(str(out))
    assert np.abs(generate(pipe, "a photo of sks digit") - before).max() > 1e-4
    # A rerun reuses the class images instead of generating them again.
    again = run(DreamBoothLoraSDXLTask, argv + ["--resume_from_checkpoint", "latest"])
    assert again["class_images_generated"] == 0


def test_controlnet_sdxl_output_loads_and_steers_the_sdxl_controlnet_pipeline(tiny_sdxl, digits, tmp_path):
    from diffusers import ControlNetModel

    out = tmp_path / "cn"
    summary = run(ControlNetSDXLTask, base_args(tiny_sdxl, digits, out, "--learning_rate", "1e-2"))
    assert summary["output"]["kind"] == "controlnet" and summary["conditioning"] == "derived (sobel)"
    controlnet = ControlNetModel.from_pretrained(str(out))
    assert controlnet.config.addition_embed_type == "text_time"
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == (16, 32)  # the f=2 VAE
    pipe = sdxl_pipeline(tiny_sdxl, "StableDiffusionXLControlNetPipeline", controlnet=controlnet)
    blank, edge = Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))
    edge.paste((255, 255, 255), (4, 0, 8, 16))
    a, b = generate(pipe, image=blank), generate(pipe, image=edge)
    assert np.abs(a - b).max() > 1e-5  # the trained ControlNet turns the conditioning into a different image


def test_vae_stays_fp32_outside_autocast_unless_a_vae_is_given(tiny_sdxl, digits, tmp_path):
    from diffusers_npu.train import prepare_args
    from diffusers_npu.train.task import Runtime

    def built(*extra):
        args = prepare_args(TextToImageSDXLTask, base_args(tiny_sdxl, digits, tmp_path / "o", *extra))
        task = TextToImageSDXLTask(args, Runtime(weight_dtype=torch.bfloat16))
        return task, task.build_module()

    task, module = built()
    assert task.vae.dtype == torch.float32 and task.text_encoder_2.dtype == torch.bfloat16
    seen = []
    task.vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.latents({"pixel_values": torch.zeros(1, 3, 16, 16)})
    assert seen == [torch.float32]  # the VAE ran in fp32 although the step autocasts to bf16
    task, _ = built("--pretrained_vae_model_name_or_path", os.path.join(tiny_sdxl, "vae"))
    assert task.vae.dtype == torch.bfloat16


@pytest.mark.parametrize("task_cls,flags,message", [
    (TextToImageSDXLTask, ["--train_text_encoder"], "--train_text_encoder: SDXL trains its text encoders with LoRA"),
    (TextToImageLoraSDXLTask, ["--train_text_encoder", "--cache_latents"], "--cache_latents stores the prompt"),
    (DreamBoothLoraSDXLTask, ["--use_dora"], "--use_dora: DoRA adapters are not supported"),
    (DreamBoothLoraSDXLTask, ["--do_edm_style_training"], "--do_edm_style_training: EDM-style training"),
    (ControlNetSDXLTask, ["--crops_coords_top_left_h", "-1"], "--crops_coords_top_left_h must be >= 0"),
    (TextToImageSDXLTask, ["--timestep_bias_strategy", "later", "--timestep_bias_portion", "2"],
     "--timestep_bias_portion must be in (0, 1]"),
])
def test_bad_sdxl_flags_fail_with_one_named_line(task_cls, flags, message, tiny_sdxl, digits, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(task_cls, base_args(tiny_sdxl, digits, out, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists() or not any(n.startswith("checkpoint") for n in os.listdir(out))


def test_an_sd_model_is_refused_by_the_sdxl_tasks_with_a_named_line(digits, tmp_path, capsys):
    from diffusers_npu.presets import build_test_pipeline

    sd = build_test_pipeline("sd", str(tmp_path / "sd"))
    capsys.readouterr()  # the pipeline writer's progress bars are not the entry point's output
    assert main(TextToImageSDXLTask, base_args(sd, digits, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a StableDiffusionPipeline folder" in err[0] and "--pretrained_model_name_or_path" \
        in err[0]


def test_text_encoder_adapters_get_their_own_learning_rate_and_weight_decay(tiny_sdxl, digits, tmp_path):
    from diffusers_npu.train import prepare_args
    from diffusers_npu.train.loop import Trainer

    argv = base_args(tiny_sdxl, digits, tmp_path / "o", "--train_text_encoder", "--learning_rate", "1e-4",
                     "--text_encoder_lr", "3e-5", "--adam_weight_decay_text_encoder", "0.002")
    t = Trainer(prepare_args(DreamBoothLoraSDXLTask, argv), DreamBoothLoraSDXLTask)
    t.setup()
    unet_group, te_group = t.optimizer.param_groups
    assert (unet_group["lr"], te_group["lr"], te_group["weight_decay"]) == (1e-4, 3e-5, 0.002)
    te_ids = {id(p) for te in (t.task.text_encoder, t.task.text_encoder_2) for p in te.parameters()}
    assert all(id(p) in te_ids for p in te_group["params"]) and not any(id(p) in te_ids for p in unet_group["params"])


def test_sdxl_default_resolution_is_1024_for_a_real_model():
    from diffusers_npu.train.config import DeviceInfo, parse_args, resolve_defaults

    args = parse_args(TextToImageSDXLTask, ["--pretrained_model_name_or_path", "/m", "--dataset_name", "/d"])
    assert resolve_defaults(args, DeviceInfo("cpu"), None, TextToImageSDXLTask).resolution == 1024


def test_validation_decodes_with_the_fp32_vae_outside_autocast(tiny_sdxl, digits, tmp_path, monkeypatch):
    from diffusers.models.autoencoders.vae import Decoder

    seen = []
    real = Decoder.forward

    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, *a, **k)

    monkeypatch.setattr(Decoder, "forward", spy)
    run(TextToImageSDXLTask, base_args(tiny_sdxl, digits, tmp_path / "o", "--mixed_precision", "bf16",
                                       "--validation_prompts", "a handwritten digit one", "--num_validation_images",
                                       "1", "--validation_inference_steps", "2", steps=1))
    assert seen and not any(seen)  # the VAE decoded outside the bf16 autocast of validation


def test_full_fine_tuning_defaults_to_fsdp_and_lora_to_ddp():
    from diffusers_npu.train.config import build_parser
    from diffusers_npu.train.registry import get_task

    assert get_task("text-to-image-sdxl") is TextToImageSDXLTask
    for name, mode in (("text_to_image_sdxl", "fsdp"), ("text_to_image_lora_sdxl", "ddp"),
                       ("dreambooth_lora_sdxl", "ddp"), ("controlnet_sdxl", "ddp")):
        cls = get_task(name)
        assert cls.launch.distributed == mode and build_parser(cls).parse_args([]).distributed == mode
        assert os.path.isfile(os.path.join(REPO, cls.example))


# ------------------------------------------------------------------------------------------------ slow

@pytest.mark.slow
def test_every_sdxl_task_on_two_processes_and_full_fine_tuning_under_every_engine(tiny_sdxl, digits, tmp_path):
    """One torchrun (2 CPU processes, gloo, tests/dist_worker.py): full fine-tuning under ddp, fsdp, ZeRO-2 and
    ZeRO-3, one step at global batch 4, equals one process with batch 4 within 0.1% of the largest update (AdamW at
    a huge epsilon: the update is proportional to the gradient) and ran on the engine asked for; LoRA with both
    text encoders, DreamBooth-LoRA with prior preservation and ControlNet under ddp and fsdp train, and what
    they save loads."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from test_distributed import MATRIX, _assert_ranks_agree, _job, _ran, _torchrun
    from trainkit import free_port

    data = ["--pretrained_model_name_or_path", tiny_sdxl, "--dataset_name", digits, "--resolution", "16",
            "--max_train_samples", "32"]
    compare = ["--per_sample_noise", "--learning_rate", "1.0", "--adam_epsilon", "1e3", "--adam_weight_decay", "0"]
    jobs = [_job(f"full-{e}", "text_to_image_sdxl", tmp_path / f"full-{e}", 1, *data, *compare, *flags)
            for e, flags in MATRIX.items()]
    for e in ("ddp", "fsdp"):
        dist = ["--distributed", e, "--learning_rate", "1e-2"]
        jobs += [_job(f"lora-{e}", "text_to_image_lora_sdxl", tmp_path / f"lora-{e}", 2, *data, *dist,
                      "--train_text_encoder", "--rank", "4"),
                 _job(f"dblora-{e}", "dreambooth_lora_sdxl", tmp_path / f"dblora-{e}", 2, *data, *dist,
                      "--with_prior_preservation", "--num_class_images", "2", "--class_inference_steps", "2",
                      "--sample_batch_size", "2", batch=1),
                 _job(f"cn-{e}", "controlnet_sdxl", tmp_path / f"cn-{e}", 2, *data, *dist)]
    results, _ = _torchrun(tmp_path, jobs, free_port())
    _assert_ranks_agree(results, sharded={n for n in results if n.endswith(("fsdp", "zero3"))})
    for job in jobs:
        name = job["name"]
        assert _ran(_torchrun.engines, name, name.split("-")[1]), (name, _torchrun.engines[name])

    run(TextToImageSDXLTask, base_args(tiny_sdxl, digits, tmp_path / "one", *compare, steps=1, batch=4))
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").state_dict()

    def update(folder):
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict()
        return torch.cat([(unet[k] - base[k]).flatten() for k in base])

    d1 = update(tmp_path / "one")
    assert d1.abs().max() > 0
    for e in MATRIX:
        d2 = update(tmp_path / f"full-{e}")
        assert d2.abs().max() > 0, f"{e}: the saved UNet is the base model (nothing trained)"
        assert (d2 - d1).abs().max() <= 1e-3 * d1.abs().max(), e
    # the sharded engines' final UNet: each rank wrote its own tensors, and the pipeline loads and generates
    index = tmp_path / "full-fsdp" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert len(set(json.load(open(index))["weight_map"].values())) == 2
    generate(sdxl_pipeline(str(tmp_path / "full-zero3")))
    for e in ("ddp", "fsdp"):
        for name in (f"lora-{e}", f"dblora-{e}"):
            sd = load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors"))
            ups = [v for k, v in sd.items() if "lora_B" in k or ".up." in k]
            assert ups and max(float(v.abs().max()) for v in ups) > 0, name
        assert {k.split(".")[0] for k in load_file(str(tmp_path / f"lora-{e}" / "pytorch_lora_weights.safetensors"))} \
            == {"unet", "text_encoder", "text_encoder_2"}
        assert ControlNetModel.from_pretrained(str(tmp_path / f"cn-{e}")).config.addition_embed_type == "text_time"


@pytest.mark.slow
def test_embedded_sdxl_default_passes_the_learning_check(tmp_path, monkeypatch):
    """What the 1-device SDXL launcher runs with no arguments: the embedded SDXL digits model, its tuned config,
    and the learning check (>= 90% of generated digits read as the prompt's digit)."""
    monkeypatch.delenv("OMP_NUM_THREADS")  # both cores for the longest run: the trainer's own choice
    out = tmp_path / "embedded"
    summary = run(TextToImageSDXLTask, ["--config", os.path.join(REPO, TextToImageSDXLTask.launch.embedded["config"]),
                                        "--output_dir", str(out), "--report_to", "none", "--disable_progress_bar"])
    check = summary["learning_check"]
    assert check["passed"] and check["agreement"] >= 0.9, check
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
