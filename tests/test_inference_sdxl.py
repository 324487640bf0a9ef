"""Offline CPU tests of SDXL inference (text-to-image with refiner, img2img, inpainting), ControlNet (SD and
SDXL), LoRA, training outputs that name their base model, and the offline Hub message, on tiny pipelines.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from inference_inputs import (COMMON, no_load, outputs, pixels, run_main, save_learned_embeds, save_lora, save_mask,
                              save_rgb, tiny, write_training_info)
from inference_inputs import one_torch_thread  # noqa: F401 (autouse fixture)

from diffusers_npu.inference import loading


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-inputs")
    return {
        "image": save_rgb(root / "image.png"),
        "edges": save_rgb(root / "edges.png", seed=3),
        "mask": save_mask(root / "mask.png"),
        "lora_sd": save_lora(tiny("sd"), root / "lora_sd"),
        "lora_sdxl": save_lora(tiny("sdxl"), root / "lora_sdxl"),
    }


def one(folder):
    (img, meta), = outputs(folder).values()
    return pixels(img), meta


def gen(task, argv, out, capsys, seed=0):
    rc, _, err = run_main(task, [*COMMON, "--seed", seed, *argv, "--output_dir", out], capsys)
    assert rc == 0, err[-3000:]
    return one(out)


def test_sdxl_folders_use_the_sdxl_pipelines(tmp_path, files, capsys):
    sdxl, prompt = tiny("sdxl"), ["--prompt", "a red castle"]
    cases = {
        "t2i": ("text-to-image", ["--model", sdxl, *prompt], "StableDiffusionXLPipeline"),
        "i2i": ("img2img", ["--model", sdxl, *prompt, "--image", files["image"], "--strength", "1"],
                "StableDiffusionXLImg2ImgPipeline"),
        "inpaint9": ("inpainting", ["--model", tiny("sdxl-inpaint"), *prompt, "--image", files["image"],
                                    "--mask_image", files["mask"]], "StableDiffusionXLInpaintPipeline"),
        # SDXL's inpainting pipeline also serves a plain 4-channel SDXL UNet (it blends the mask into latents)
        "inpaint4": ("inpainting", ["--model", sdxl, *prompt, "--image", files["image"], "--mask_image", files["mask"]],
                     "StableDiffusionXLInpaintPipeline"),
        "refiner_as_img2img": ("img2img", ["--model", tiny("sdxl-refiner"), *prompt, "--image", files["image"],
                                           "--strength", "1"], "StableDiffusionXLImg2ImgPipeline"),
    }
    results = {}
    for name, (task, argv, cls) in cases.items():
        results[name] = gen(task, argv, tmp_path / name, capsys)
        img, meta = results[name]
        assert meta["pipeline"] == cls and meta["task"] == task, name
        assert img.shape == (32, 32, 3) and img.std() > 0, name
    assert results["t2i"][1]["guidance_scale"] == 5.0  # SDXL's own default, recorded
    assert not np.array_equal(results["inpaint9"][0], results["inpaint4"][0])


def test_sdxl_refiner_finishes_the_base_models_schedule(tmp_path, files, capsys, monkeypatch):
    """Ensemble of experts: with N steps the base runs the first high_noise_frac of them, the refiner the rest."""
    calls = {}

    def counted(name, loader):
        def load(*args, **kwargs):
            pipe = loader(*args, **kwargs)
            calls[name] = 0
            pipe.unet.register_forward_pre_hook(lambda *a: calls.__setitem__(name, calls[name] + 1))
            return pipe
        return load

    monkeypatch.setattr(loading, "load_pipeline", counted("base", loading.load_pipeline))
    monkeypatch.setattr(loading, "load_refiner", counted("refiner", loading.load_refiner))
    base = ["--model", tiny("sdxl"), "--prompt", "a red castle", "--num_inference_steps", "4"]
    alone, _ = gen("text-to-image", base, tmp_path / "alone", capsys)
    assert calls == {"base": 4}
    refined, meta = gen("text-to-image", [*base, "--refiner", tiny("sdxl-refiner")], tmp_path / "refined", capsys)
    # Euler, 4 steps ("leading"): timesteps 751, 501, 251, 1; the base keeps those >= (1 - 0.8) * 1000
    assert calls == {"base": 3, "refiner": 1}, calls
    assert meta["refiner"] == tiny("sdxl-refiner") and meta["high_noise_frac"] == 0.8
    half, meta = gen("text-to-image", [*base, "--refiner", tiny("sdxl-refiner"), "--high_noise_frac", "0.5"],
                     tmp_path / "half", capsys)
    assert calls == {"base": 2, "refiner": 2} and meta["high_noise_frac"] == 0.5
    assert not np.array_equal(alone, refined) and not np.array_equal(refined, half)

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    bad = [
        (["--model", tiny("sd"), "--prompt", "x", "--refiner", tiny("sdxl-refiner")],
         "is not a Stable Diffusion XL pipeline; the refiner finishes SDXL images only"),
        ([*base, "--refiner", tiny("sd")], "--refiner: " + tiny("sd") + " is a StableDiffusionPipeline folder"),
        ([*base, "--high_noise_frac", "0.5"], "--high_noise_frac only applies with --refiner"),
        ([*base, "--refiner", tiny("sdxl-refiner"), "--high_noise_frac", "1"], "--high_noise_frac: expected a value in (0.0, 1.0), got '1'"),
    ]
    for argv, message in bad:
        rc, _, err = run_main("text-to-image", [*COMMON, *argv, "--output_dir", tmp_path / "bad"], capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert not (tmp_path / "bad").exists()


def test_controlnet_sd_and_sdxl(tmp_path, files, capsys, monkeypatch):
    prompt = ["--prompt", "a red castle"]
    for model, net, cls in ((tiny("sd"), tiny("controlnet"), "StableDiffusionControlNetPipeline"),
                            (tiny("sdxl"), tiny("sdxl-controlnet"), "StableDiffusionXLControlNetPipeline")):
        name = os.path.basename(net)
        run = ["--model", model, *prompt, "--controlnet", net]
        a, meta = gen("controlnet", [*run, "--image", files["image"]], tmp_path / f"{name}-a", capsys)
        b, _ = gen("controlnet", [*run, "--image", files["edges"]], tmp_path / f"{name}-b", capsys)
        off, meta0 = gen("controlnet", [*run, "--image", files["image"], "--controlnet_conditioning_scale", "0"],
                         tmp_path / f"{name}-off", capsys)
        plain, _ = gen("text-to-image", ["--model", model, *prompt], tmp_path / f"{name}-plain", capsys)
        assert meta["pipeline"] == cls and meta["controlnet"] == net and meta["controlnet_conditioning_scale"] == 1.0
        assert not np.array_equal(a, b)  # the conditioning image steers the result
        # scale 0 adds exactly nothing: the plain text-to-image picture of the same seed
        assert meta0["controlnet_conditioning_scale"] == 0.0 and np.array_equal(off, plain), name

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    bad = [
        (["--model", tiny("sd"), *prompt, "--image", files["image"]], "--controlnet is required"),
        (["--model", tiny("sd"), *prompt, "--controlnet", tiny("controlnet")], "--image is required for the controlnet"),
        (["--model", tiny("sd"), *prompt, "--controlnet", tiny("sdxl-controlnet"), "--image", files["image"]],
         "is a Stable Diffusion XL ControlNet but --model"),
        (["--model", tiny("sdxl"), *prompt, "--controlnet", tiny("controlnet"), "--image", files["image"]],
         "is a Stable Diffusion 1.x/2.x ControlNet but --model"),
        (["--model", tiny("sd"), *prompt, "--controlnet", no_config, "--image", files["image"]],
         "has no config.json"),
        (["--model", tiny("sd"), *prompt, "--controlnet", tiny("sd"), "--image", files["image"]], "has no config.json"),
        (["--model", tiny("sd"), *prompt, "--controlnet", "./nowhere", "--image", files["image"]],
         "--controlnet: folder not found: ./nowhere"),
    ]
    for argv, message in bad:
        rc, _, err = run_main("controlnet", [*COMMON, *argv, "--output_dir", tmp_path / "bad"], capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)


def test_lora_changes_the_output_by_its_scale(tmp_path, files, capsys):
    for model, lora in ((tiny("sd"), files["lora_sd"]), (tiny("sdxl"), files["lora_sdxl"])):
        run = ["--model", model, "--prompt", "a red castle"]
        key = os.path.basename(lora)
        plain, meta = gen("text-to-image", run, tmp_path / f"{key}-plain", capsys)
        full, meta1 = gen("text-to-image", [*run, "--lora", lora], tmp_path / f"{key}-1", capsys)
        half, _ = gen("text-to-image", [*run, "--lora", lora, "--lora_scale", "0.5"], tmp_path / f"{key}-05", capsys)
        zero, meta0 = gen("text-to-image", [*run, "--lora", os.path.join(lora, "pytorch_lora_weights.safetensors"),
                                            "--lora_scale", "0"], tmp_path / f"{key}-0", capsys)
        assert meta["lora"] is None and meta["lora_scale"] is None
        assert meta1["lora"] == lora and meta1["lora_scale"] == 1.0 and meta0["lora_scale"] == 0.0
        assert not np.array_equal(plain, full) and not np.array_equal(full, half)
        assert np.array_equal(zero, plain)  # scale 0: exactly the base model
    # the LoRA also works on the image tasks
    img, meta = gen("img2img", ["--model", tiny("sd"), "--prompt", "x", "--image", files["image"], "--strength", "1",
                                "--lora", files["lora_sd"]], tmp_path / "i2i", capsys)
    assert meta["lora"] == files["lora_sd"] and img.std() > 0
    # a LoRA of another architecture: one line naming the flag and the mismatch
    rc, _, err = run_main("text-to-image", [*COMMON, "--model", tiny("sdxl"), "--prompt", "x", "--lora",
                                            files["lora_sd"], "--output_dir", tmp_path / "bad"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: --lora: cannot load ")
    assert "size mismatch" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
    assert "was unsuccessful" not in err  # the library's multi-line log of the same error is not repeated


def test_training_outputs_find_their_base_model(tmp_path, files, capsys, monkeypatch):
    """LoRA / textual inversion / ControlNet outputs record their base model; --model may then be omitted."""
    import shutil

    sd = tiny("sd")
    lora = tmp_path / "lora_out"
    shutil.copytree(files["lora_sd"], lora)
    info = write_training_info(lora, sd, "lora")
    img, meta = gen("text-to-image", ["--prompt", "a red castle", "--lora", lora], tmp_path / "lora", capsys)
    ref, _ = gen("text-to-image", ["--model", sd, "--prompt", "a red castle", "--lora", lora], tmp_path / "ref", capsys)
    assert meta["model"] == sd and meta["model_from"] == info and np.array_equal(img, ref)
    # the older LoRA outputs: lora_info.json
    os.remove(info)
    (lora / "lora_info.json").write_text(json.dumps({"base_model": sd}))
    rc, _, err = run_main("text-to-image", [*COMMON, "--prompt", "x", "--lora", lora, "--seed", "0",
                                            "--output_dir", tmp_path / "old"], capsys)
    assert rc == 0 and f"--model not given: using the base model {sd} recorded in {lora / 'lora_info.json'}" in err

    ti = tmp_path / "ti_out"
    ti.mkdir()
    embeds = save_learned_embeds(ti / "learned_embeds.safetensors")
    write_training_info(ti, sd, "textual_inversion", task="textual_inversion")
    _, meta = gen("textual-inversion", ["--prompt", "a <cat-toy>", "--learned_embeds", embeds], tmp_path / "ti", capsys)
    assert meta["model"] == sd and meta["token"] == "<cat-toy>"

    cn = tmp_path / "cn_out"
    shutil.copytree(tiny("sdxl-controlnet"), cn)
    write_training_info(cn, os.path.relpath(tiny("sdxl"), cn), "controlnet", task="controlnet")  # relative to it
    _, meta = gen("controlnet", ["--prompt", "x", "--controlnet", cn, "--image", files["image"]], tmp_path / "cn",
                  capsys)
    assert os.path.realpath(meta["model"]) == os.path.realpath(tiny("sdxl"))
    assert meta["pipeline"] == "StableDiffusionXLControlNetPipeline"

    # an explicit --model wins, with a warning when it is not the recorded base
    rc, _, err = run_main("textual-inversion", [*COMMON, "--model", tiny("sd-safety"), "--prompt", "a <cat-toy>",
                                                "--learned_embeds", embeds, "--output_dir", tmp_path / "other"], capsys)
    assert rc == 0 and f"--learned_embeds was trained on {sd}" in err

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    gone = tmp_path / "gone_out"
    gone.mkdir()
    write_training_info(gone, tmp_path / "deleted-base", "controlnet")
    shutil.copy(os.path.join(tiny("controlnet"), "config.json"), gone)
    shutil.copy(os.path.join(tiny("controlnet"), "diffusion_pytorch_model.safetensors"), gone)
    bad = [
        ("controlnet", ["--prompt", "x", "--controlnet", gone, "--image", files["image"]],
         f"names the base model {tmp_path / 'deleted-base'}, which is not a folder here; pass --model"),
        ("controlnet", ["--prompt", "x", "--controlnet", cn, "--lora", lora, "--image", files["image"]],
         "--model not given and the training outputs disagree"),
    ]
    for task, argv, message in bad:
        rc, _, err = run_main(task, [*COMMON, *argv, "--output_dir", tmp_path / "bad"], capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)


def test_offline_hub_ids_say_pass_a_local_folder(tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 (tests/conftest.py): no retries, no 'does not appear to have a file named ...'."""
    from diffusers_npu import model_folder
    from diffusers_npu.inference import models

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.setattr(loading, "load_pipeline", no_load)
    rc, _, err = run_main("text-to-image", ["--device", "cpu", "--prompt", "x", "--output_dir", tmp_path / "o"], capsys)
    assert rc == 2 and err == (
        "error: --model: 'CompVis/ldm-text2im-large-256' (the default) is not a local folder and the Hugging Face Hub "
        "cannot be reached (no network, or HF_HUB_OFFLINE is set); pass a local pipeline folder with --model\n")
    rc, _, err = run_main("img2img", ["--model", "someone/sd-model", "--prompt", "x", "--image", "x.png"], capsys)
    assert rc == 2 and "'someone/sd-model' is not a local folder" in err and "(the default)" not in err
    # the other Hub-capable flags say the same about themselves
    rc, _, err = run_main("controlnet", ["--model", tiny("sd"), "--prompt", "x", "--image", "x.png", "--controlnet",
                                         "someone/cn"], capsys)
    assert rc == 2 and "error: --controlnet: 'someone/cn' is not a local folder" in err
    assert "pass a local ControlNet folder with --controlnet" in err
    rc, _, err = run_main("text-to-image", ["--model", tiny("sdxl"), "--prompt", "x", "--refiner", "someone/refiner"],
                          capsys)
    assert rc == 2 and "pass a local pipeline folder with --refiner" in err

    # online but the connection drops: the network error is recognised, not blamed on the repository
    monkeypatch.setattr(models, "hub_is_reachable", lambda: True)
    monkeypatch.setattr(model_folder, "hub_is_reachable", lambda: True)

    def dropped(*args, **kwargs):
        raise OSError("Connection reset by peer while fetching model_index.json")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", dropped)
    rc, _, err = run_main("text-to-image", ["--prompt", "x", "--model", "someone/model"], capsys)
    assert rc == 2 and "cannot be reached" in err and "pass a local pipeline folder with --model" in err

    # offline with the index in the local Hub cache: the run goes on from the cache only
    monkeypatch.setattr(models, "hub_is_reachable", lambda: False)
    monkeypatch.setattr(models, "_cached_index", lambda repo: os.path.join(tiny("sd"), "model_index.json"))
    from diffusers_npu.inference import parse_args, prepare

    plan = prepare(parse_args("text-to-image", ["--device", "cpu", "--prompt", "x", "--seed", "0"]))
    assert plan.model == "CompVis/ldm-text2im-large-256" and plan.local_files_only and not plan.local
    assert plan.pipeline_class.__name__ == "StableDiffusionPipeline"


def test_sdxl_is_refused_where_there_is_no_sdxl_pipeline(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", no_load)
    rc, _, err = run_main("depth-to-image", ["--device", "cpu", "--model", tiny("sdxl"), "--prompt", "x", "--image",
                                             files["image"], "--depth_map", files["image"]], capsys)
    assert rc == 2 and "is a Stable Diffusion XL pipeline; the depth-to-image task supports Stable Diffusion 1.x/2.x" in err
    rc, _, err = run_main("unconditional", ["--device", "cpu", "--model", tiny("sdxl")], capsys)
    assert rc == 2 and "the unconditional task supports Stable Diffusion 1.x/2.x folders only" in err
    rc, _, err = run_main("text-to-image", ["--device", "cpu", "--model", tiny("sdxl-refiner"), "--prompt", "x"], capsys)
    assert rc == 2 and "is an SDXL refiner (conditioned on an aesthetic score); use it with --refiner" in err
