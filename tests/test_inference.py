"""Offline CPU tests of the inference package (diffusers_npu.inference), the test_infer/*.py scripts and
``diffusers-npu generate`` on Stable Diffusion 1.x-style, LDM and DDPM tiny pipelines (presets.build_test_pipeline).

Everything runs in-process (the scripts through runpy), with one torch thread: on a shared 2-core machine
multi-threaded kernels on 32x32 images are 20-50x slower. SDXL, ControlNet, LoRA and training outputs:
test_inference_sdxl.py; signals, full disks and failures: test_inference_reliability.py.
"""
from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference_inputs import (COMMON, no_load, outputs, pixels, run_main, save_concept_folder, save_depth,
                              save_learned_embeds, save_mask, save_rgb, tiny)
from inference_inputs import one_torch_thread  # noqa: F401 (autouse fixture)

from diffusers_npu import cli, inference
from diffusers_npu.inference import loading

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "test_infer"
SCRIPT_TASKS = {
    "text-to-image.py": "text-to-image",
    "text-guide-img-to-img.py": "img2img",
    "text-guide-image-inpainting.py": "inpainting",
    "textual-inversion.py": "textual-inversion",
    "text-guide-depth-to-image.py": "depth-to-image",
    "unconditional-image-generation.py": "unconditional",
    "controlnet.py": "controlnet",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {
        "image": save_rgb(root / "image.png"),
        "image_wide": save_rgb(root / "image_wide.png", size=(48, 32), seed=1),
        "mask": save_mask(root / "mask.png"),
        "mask_wide": save_mask(root / "mask_wide.png", size=(48, 32)),
        "depth_map": save_depth(root / "depth.png"),
        "embeds": save_learned_embeds(root / "learned_embeds.safetensors", token="<cat-toy>"),
        "concept": save_concept_folder(root / "concept", token="<tiny-concept>"),
    }


SIDE_KEYS = {
    "task", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "strength", "width",
    "height", "model", "model_from", "device", "dtype", "attention", "seconds", "diffusers_version", "pipeline",
    "lora", "lora_scale", "controlnet", "controlnet_conditioning_scale", "refiner", "high_noise_frac",
    "nsfw_content_detected", "safety_checker", "base_seed", "index", "created",
}


def check_sidecar(meta, **expected):
    import diffusers

    assert SIDE_KEYS <= set(meta), SIDE_KEYS - set(meta)
    assert meta["diffusers_version"] == diffusers.__version__
    assert meta["device"] == "cpu" and isinstance(meta["seconds"], float) and meta["seconds"] >= 0
    assert meta["seed"] == meta["base_seed"] + meta["index"]
    for key, value in expected.items():
        assert meta[key] == value, (key, meta[key], value)


# ------------------------------------------------------------------------------------------ results
def test_same_seed_same_pixels_no_overwrite_and_the_safety_verdict(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*COMMON, "--model", tiny("sd-safety"), "--prompt", "a red castle", "--seed", "7", "--output_dir", out]
    assert run_main("text-to-image", argv, capsys)[0] == 0
    assert run_main("text-to-image", argv, capsys)[0] == 0  # same name taken: gets a -2 suffix
    assert run_main("text-to-image", [*argv[:-4], "--seed", "8", "--output_dir", out], capsys)[0] == 0
    files = outputs(out)
    assert set(files) == {"text-to-image-seed7", "text-to-image-seed7-2", "text-to-image-seed8"}
    a, b, c = (pixels(files[k][0]) for k in ("text-to-image-seed7", "text-to-image-seed7-2", "text-to-image-seed8"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    meta = files["text-to-image-seed7"][1]
    check_sidecar(meta, pipeline="StableDiffusionPipeline", seed=7, prompt="a red castle", width=32, height=32,
                  safety_checker="enabled", guidance_scale=7.5, strength=None, model=tiny("sd-safety"),
                  nsfw_content_detected=False, lora=None, model_from=None)
    assert a.std() > 0  # a real picture, not blanked

    # A checker whose thresholds flag everything: the verdict is recorded, the image blanked, the user told.
    flagged = tmp_path / "flagged"
    rc, _, err = run_main("text-to-image", [*COMMON, "--model", tiny("sd-nsfw"), "--prompt", "a red castle", "--seed",
                                            "7", "--output_dir", flagged], capsys)
    assert rc == 0 and "image 1: the safety checker flagged it (NSFW) and blanked it" in err
    (img, meta), = outputs(flagged).values()
    assert meta["nsfw_content_detected"] is True and meta["safety_checker"] == "enabled"
    assert pixels(img).max() == 0


def test_textual_inversion_token_changes_output(tmp_path, files, capsys):
    base = [*COMMON, "--model", tiny("sd"), "--seed", "11"]
    prompt = ["--prompt", "a photo of <cat-toy>"]
    runs = {
        "plain": ("text-to-image", [*prompt]),
        "ti": ("textual-inversion", [*prompt, "--learned_embeds", files["embeds"]]),
        # concepts-library folder: learned_embeds.bin + token_identifier.txt (token taken from the .txt)
        "concept": ("textual-inversion", ["--prompt", "a photo of <tiny-concept>", "--learned_embeds", files["concept"]]),
        "plain2": ("text-to-image", ["--prompt", "a photo of <tiny-concept>"]),
        # the embedding alone (prompt without the token) changes nothing
        "notoken": ("textual-inversion", ["--prompt", "a photo of", "--learned_embeds", files["embeds"]]),
        "plain3": ("text-to-image", ["--prompt", "a photo of"]),
    }
    for name, (task, argv) in runs.items():
        rc, _, err = run_main(task, [*base, *argv, "--output_dir", tmp_path / name], capsys)
        assert rc == 0, err
        if name == "notoken":
            assert "does not contain the token '<cat-toy>'" in err
        if name == "ti":
            assert "loaded textual-inversion token <cat-toy> (2 vector(s))" in err
    got = {name: outputs(tmp_path / name) for name in runs}
    img = {name: pixels(next(iter(v.values()))[0]) for name, v in got.items()}
    meta = {name: next(iter(v.values()))[1] for name, v in got.items()}
    assert not np.array_equal(img["plain"], img["ti"])
    assert not np.array_equal(img["plain2"], img["concept"])
    assert np.array_equal(img["notoken"], img["plain3"])
    assert meta["ti"]["token"] == "<cat-toy>" and meta["concept"]["token"] == "<tiny-concept>"
    assert meta["ti"]["task"] == "textual-inversion" and meta["ti"]["safety_checker"] == "absent"


def test_token_flag_overrides_and_bad_embeddings(tmp_path, files, capsys, monkeypatch):
    from safetensors.torch import save_file

    bad_dim = tmp_path / "bad_dim.safetensors"
    save_file({"<x>": torch.zeros(1, 7)}, str(bad_dim))
    two = tmp_path / "two.safetensors"
    save_file({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, str(two))
    base = [*COMMON, "--model", tiny("sd"), "--prompt", "a <my-token>", "--seed", "0", "--output_dir", tmp_path / "o"]
    cases = [
        (["--learned_embeds", tmp_path / "missing.safetensors"], "--learned_embeds: not found"),
        (["--learned_embeds", bad_dim], "--learned_embeds: the embedding has dimension 7 but the text encoder"),
        (["--learned_embeds", two], "holds 2 embeddings (<a>, <b>); expected exactly one"),
        (["--learned_embeds", files["embeds"], "--token", "a"], "--token: 'a' is already a token"),
        (["--learned_embeds", files["embeds"], "--token", "my token"], "contains white space"),
        ([], "--learned_embeds is required"),
        (["--learned_embeds", files["embeds"], "--model", tiny("sdxl")], "supports Stable Diffusion 1.x/2.x folders"),
    ]
    monkeypatch.setattr(loading, "load_pipeline", no_load)
    for extra, message in cases:
        rc, _, err = run_main("textual-inversion", [*base, *extra], capsys)
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    rc, _, err = run_main("textual-inversion", [*base, "--learned_embeds", files["embeds"], "--token", "<my-token>"],
                          capsys)
    assert rc == 0, err
    (_, meta), = outputs(tmp_path / "o").values()
    assert meta["token"] == "<my-token>"


def bad_input_cases(f, tmp):
    no_index = tmp / "no_index"
    no_index.mkdir(exist_ok=True)
    a_file = tmp / "a_file"
    a_file.write_text("x")
    sd, ddpm = tiny("sd"), tiny("ddpm")
    return [
        ("img2img", ["--model", sd, "--prompt", "x", "--image", tmp / "missing.png"], "--image: image file not found"),
        ("inpainting", ["--model", tiny("sd-inpaint"), "--prompt", "x", "--image", f["image"], "--mask_image",
                        f["mask_wide"]], "--mask_image: "),
        ("text-to-image", ["--model", no_index, "--prompt", "x"], f"--model: {no_index} has no model_index.json"),
        ("text-to-image", ["--model", tmp / "does-not-exist", "--prompt", "x"], "does-not-exist does not exist"),
        ("text-to-image", ["--model", a_file, "--prompt", "x"], "a_file is a file; expected a diffusers pipeline"),
        ("text-to-image", ["--model", sd], "--prompt is required"),
        ("text-to-image", ["--model", sd, "--prompt", "  "], "--prompt is required"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--dtype", "fp16"], "--dtype fp16 is not supported on cpu"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--num_inference_steps", "0"], "--num_inference_steps"),
        ("unconditional", ["--model", ddpm, "--num_inference_steps", "-3"], "--num_inference_steps"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--height", "30"], "--height: expected a positive multiple"),
        ("img2img", ["--model", sd, "--prompt", "x", "--image", f["image"], "--width", "33"], "--width"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--dtype", "fp64"], "--dtype"),
        ("text-to-image", ["--model", tiny("ldm"), "--prompt", "x", "--negative_prompt", "y"],
         "--negative_prompt: LDMTextToImagePipeline"),
        ("img2img", ["--model", tiny("sd-inpaint"), "--prompt", "x", "--image", f["image"]],
         "has a UNet with 9 input channels (an inpainting model); the img2img task needs 4"),
        ("inpainting", ["--model", sd, "--prompt", "x", "--image", f["image"], "--mask_image", f["mask"]],
         "the inpainting task needs 9 (an inpainting model)"),
        ("img2img", ["--model", sd, "--prompt", "x", "--image", f["image"], "--strength", "0.1",
                     "--num_inference_steps", "2"], "--strength 0.1 with --num_inference_steps 2"),
        ("img2img", ["--model", sd, "--prompt", "x", "--image", f["image"], "--strength", "0"], "--strength"),
        ("depth-to-image", ["--model", tiny("sd-depth-noest"), "--prompt", "x", "--image", f["image"]],
         "--depth_map / --depth_estimator"),
        ("depth-to-image", ["--model", tiny("sd-depth-noest"), "--prompt", "x", "--image", f["image"], "--depth_map",
                            tmp / "nope.png"], "--depth_map: image file not found"),
        ("unconditional", ["--model", ddpm, "--prompt", "x"], "unrecognized arguments: --prompt"),
        ("unconditional", ["--model", sd], "holds a text-guided StableDiffusionPipeline; the unconditional task"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--device", "tpu"], "--device"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--guidance_scal", "3"], "did you mean --guidance_scale?"),
        ("text-to-image", ["--model", sd, "--prompt", "x", "--lora_scale", "0.5"], "--lora_scale only applies with --lora"),
        ("text-to-image", ["--model", tiny("ldm"), "--prompt", "x", "--lora", f["embeds"]],
         "holds no LoRA weights"),
    ]


def test_bad_input_exits_2_before_loading(tmp_path, files, capsys, monkeypatch):
    monkeypatch.setattr(loading, "load_pipeline", no_load)
    out = tmp_path / "out"
    for task, argv, message in bad_input_cases(files, tmp_path):
        rc, _, err = run_main(task, ["--device", "cpu", *argv, "--output_dir", out], capsys)
        assert rc == 2, (task, argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
        assert not out.exists(), argv


def test_bf16_refused_where_unsupported(tmp_path, capsys, monkeypatch):
    from diffusers_npu import device

    out = tmp_path / "out"
    argv = ["--device", "cpu", "--model", tiny("ddpm"), "--num_inference_steps", "2", "--seed", "0", "--dtype", "bf16",
            "--output_dir", out]
    monkeypatch.setattr(device, "supports_bf16", lambda d: False)
    rc, _, err = run_main("unconditional", argv, capsys)
    assert rc == 2 and "--dtype bf16 is not supported" in err and not out.exists()
    monkeypatch.undo()
    rc, _, err = run_main("unconditional", argv, capsys)  # CPU supports bf16
    assert rc == 0, err
    (img, meta), = outputs(out).values()
    assert meta["dtype"] == "bf16" and img.size == (32, 32) and pixels(img).std() > 0


def test_safety_checker_switch(tmp_path, files, capsys):
    sd = tiny("sd-safety")
    pipe = inference.load_pipeline(sd, task="text-to-image")
    assert pipe.safety_checker is not None
    pipe = inference.load_pipeline(sd, task="text-to-image", disable_safety_checker=True)
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    # a copy whose safety_checker folder was deleted (model_index.json still lists it)
    broken = tmp_path / "sd_no_checker"
    shutil.copytree(sd, broken)
    shutil.rmtree(broken / "safety_checker")
    base = [*COMMON, "--model", broken, "--prompt", "x", "--seed", "0", "--output_dir", tmp_path / "out"]
    rc, _, err = run_main("text-to-image", base, capsys)
    assert rc == 2 and "has no 'safety_checker' folder (model_index.json lists it)" in err
    assert "pass --disable_safety_checker" in err
    rc, _, err = run_main("text-to-image", [*base, "--disable_safety_checker"], capsys)
    assert rc == 0, err
    (_, meta), = outputs(tmp_path / "out").values()
    assert meta["safety_checker"] == "disabled" and meta["nsfw_content_detected"] is None
    # folders without any safety checker run with and without the flag
    for flag in ([], ["--disable_safety_checker"]):
        argv = [*COMMON, "--model", tiny("sd"), "--prompt", "x", "--image", files["image"], "--seed", "0",
                "--strength", "1", "--output_dir", tmp_path / "o2"]
        assert run_main("img2img", argv + flag, capsys)[0] == 0
    metas = [meta for _, meta in outputs(tmp_path / "o2").values()]
    assert sorted(m["safety_checker"] for m in metas) == ["absent", "disabled"]


def test_depth_sources(tmp_path, files, capsys):
    base = [*COMMON, "--prompt", "two tigers", "--image", files["image"], "--seed", "4", "--num_inference_steps", "4"]
    noest = tiny("sd-depth-noest")
    rc, _, err = run_main("depth-to-image", [*base, "--model", noest, "--depth_map", files["depth_map"],
                                             "--output_dir", tmp_path / "map"], capsys)
    assert rc == 0, err
    rc, _, err = run_main("depth-to-image", [*base, "--model", noest, "--depth_estimator", tiny("dpt"),
                                             "--output_dir", tmp_path / "est"], capsys)
    assert rc == 0, err
    (a, meta_a), = outputs(tmp_path / "map").values()
    (b, meta_b), = outputs(tmp_path / "est").values()
    assert a.size == b.size == (32, 32)
    assert meta_a["depth_map"] == files["depth_map"] and meta_b["depth_estimator"] == tiny("dpt")
    assert not np.array_equal(pixels(a), pixels(b))
    flat = tmp_path / "flat.png"
    Image.new("L", (32, 32), 128).save(flat)
    rc, _, err = run_main("depth-to-image", [*base, "--model", noest, "--depth_map", flat,
                                             "--output_dir", tmp_path / "flat"], capsys)
    assert rc == 2 and "constant" in err and not (tmp_path / "flat").exists()


def test_inpainting_size_and_attention_modes(tmp_path, files, capsys):
    from diffusers_npu.attention import attention_mode_summary

    argv = [*COMMON, "--model", tiny("sd-inpaint"), "--prompt", "a cat", "--image", files["image_wide"],
            "--mask_image", files["mask_wide"], "--seed", "2", "--height", "24", "--attention", "upcast",
            "--output_dir", tmp_path / "o"]
    rc, _, err = run_main("inpainting", argv, capsys)
    assert rc == 0, err
    (img, meta), = outputs(tmp_path / "o").values()
    assert img.size == (48, 24) and meta["attention"] == "upcast" and (meta["width"], meta["height"]) == (48, 24)
    pipe = inference.load_pipeline(tiny("sd-inpaint"), task="inpainting", attention="upcast")
    assert set(attention_mode_summary(pipe.unet)) == {"UpcastAttnProcessor"}
    assert set(attention_mode_summary(pipe.vae)) == {"UpcastAttnProcessor"}
    pipe = inference.load_pipeline(tiny("sd-inpaint"), task="inpainting", attention="default")
    assert "UpcastAttnProcessor" not in attention_mode_summary(pipe.unet)


# ----------------------------------------------------------------------------- speed-up and CLI
def test_speed_up_is_one_policy(monkeypatch, capsys):
    """The one speed-up function: attention everywhere, channels_last by device, compile mode by device."""
    from diffusers_npu.attention import attention_mode_summary

    calls = []

    def fake_compile(module, **kwargs):
        calls.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)

    def conv_layout(pipe):
        weight = next(p for p in pipe.unet.parameters() if p.ndim == 4)
        return weight.is_contiguous(memory_format=torch.channels_last)

    pipe = inference.load_pipeline(tiny("sd"), task="img2img", speed=False)
    assert set(attention_mode_summary(pipe.unet)) == {"AttnProcessor2_0"} and not conv_layout(pipe)
    done = inference.speed_up(pipe, "cpu", attention="flash")
    assert done == ["attention=flash"] and not conv_layout(pipe) and calls == []
    assert set(attention_mode_summary(pipe.unet)) == set(attention_mode_summary(pipe.vae)) == {"FlashAttnProcessor"}
    done = inference.speed_up(pipe, "cpu", compile=True)
    assert done == ["attention=auto", "channels_last", "torch.compile(mode=default)"] and conv_layout(pipe)
    assert calls[-1] == {"dynamic": False} and "slow to warm up" in capsys.readouterr().err
    inference.speed_up(pipe, "cuda", compile=True)
    assert calls[-1] == {"dynamic": False, "mode": "max-autotune"}
    n = len(calls)
    done = inference.speed_up(pipe, "npu", compile=True)
    assert len(calls) == n and "ignored on npu" in capsys.readouterr().err and "channels_last" not in done
    fresh = inference.load_pipeline(tiny("sd"), task="img2img", speed=False)
    assert "channels_last" in inference.speed_up(fresh, "cuda") and conv_layout(fresh)  # the CUDA default


def test_cli_generate(tmp_path, files, capsys):
    rc = cli.main(["generate", "unconditional", "--device", "cpu", "--model", tiny("ddpm"), "--num_inference_steps",
                   "2", "--seed", "6", "--output_dir", str(tmp_path / "cli")])
    assert rc == 0
    rc = cli.main(["generate", "text-guide-img-to-img", *COMMON, "--model", tiny("sd"), "--prompt", "x", "--image",
                   files["image"], "--strength", "1", "--seed", "1", "--output_dir", str(tmp_path / "alias")])
    assert rc == 0
    (img, meta), = outputs(tmp_path / "cli").values()
    assert meta["task"] == "unconditional" and meta["seed"] == 6 and img.size == (32, 32)
    (_, meta2), = outputs(tmp_path / "alias").values()
    assert meta2["task"] == "img2img"
    capsys.readouterr()
    assert cli.main(["generate", "no-such-task"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["generate", "text-to-image", "--model", tiny("sd"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: --prompt is required for the text-to-image task (the text " \
                                              "describing the image)"
    assert cli.main(["generate", "text_to_image", "--model", tiny("sd"), "--device", "cpu"]) == 2  # training's spelling
    assert "--prompt is required for the text-to-image task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and all(task in text for task in inference.TASKS)


def test_parsers_document_every_flag_and_task_names():
    defaults = {
        "text-to-image": "CompVis/ldm-text2im-large-256",
        "img2img": "nitrosocke/Ghibli-Diffusion",
        "inpainting": "runwayml/stable-diffusion-inpainting",
        "textual-inversion": "runwayml/stable-diffusion-v1-5",
        "depth-to-image": "stabilityai/stable-diffusion-2-depth",
        "unconditional": "anton-l/ddpm-butterflies-128",
        "controlnet": "runwayml/stable-diffusion-v1-5",
    }
    assert set(SCRIPT_TASKS.values()) == set(inference.TASKS) == set(defaults)
    for script, task in SCRIPT_TASKS.items():
        spec = inference.get_task(script)
        assert spec is inference.TASKS[task] and spec.default_model == defaults[task]
        parser = inference.build_parser(task)
        assert parser.parse_args([]).model is None  # resolved by the plan (recorded base model or Hub default)
        for action in parser._actions:
            assert action.help, (task, action.option_strings)
        text = parser.format_help()
        assert defaults[task] in text
        for flag in ("--model", "--seed", "--num_images", "--num_inference_steps", "--output_dir", "--device",
                     "--dtype", "--attention", "--compile"):
            assert flag in text
        if task != "unconditional":
            for flag in ("--prompt", "--negative_prompt", "--guidance_scale", "--height", "--width",
                         "--disable_safety_checker", "--lora", "--lora_scale"):
                assert flag in text, (task, flag)
        assert ("--learned_embeds" in text) == (task == "textual-inversion")
        assert ("--depth_map" in text) == (task == "depth-to-image")
        assert ("--controlnet" in text) == (task == "controlnet")
        assert ("--refiner" in text) == (task == "text-to-image")
        assert len((SCRIPTS / script).read_text().splitlines()) <= 25  # scripts stay thin
    # one spelling: underscores and hyphens name the same task
    assert inference.get_task("text_to_image") is inference.get_task("text-to-image")
    assert inference.get_task("depth_to_image").name == "depth-to-image"
    with pytest.raises(inference.UsageError, match="unknown task 'paint'"):
        inference.get_task("paint")


def _run_script(script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / script), *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    return exc.value.code


def test_every_script_runs_its_task(tmp_path, files, capsys, monkeypatch):
    """Each test_infer script, run as __main__ in-process, produces the task's image and sidecar."""
    embeds_sd = tiny("sd")
    argvs = {
        # LDM text2im, as the original script (LDMTextToImagePipeline), two images
        "text-to-image.py": ["--model", tiny("ldm"), "--prompt", "a painting of a squirrel", "--num_images", "2",
                             "--guidance_scale", "2.0", "--seed", "5"],
        "text-guide-img-to-img.py": ["--model", tiny("sd"), "--prompt", "ghibli style castle", "--image",
                                     files["image_wide"], "--strength", "0.75", "--num_inference_steps", "4",
                                     "--seed", "1"],
        "text-guide-image-inpainting.py": ["--model", tiny("sd-inpaint"), "--prompt", "a cat", "--image",
                                           files["image"], "--mask_image", files["mask"], "--seed", "2"],
        "textual-inversion.py": ["--model", embeds_sd, "--prompt", "a photo of <cat-toy>", "--learned_embeds",
                                 files["embeds"], "--seed", "3"],
        "text-guide-depth-to-image.py": ["--model", tiny("sd-depth"), "--prompt", "two tigers", "--image",
                                         files["image"], "--num_inference_steps", "4", "--height", "48", "--seed", "4"],
        "unconditional-image-generation.py": ["--model", tiny("ddpm"), "--seed", "6"],
        "controlnet.py": ["--model", tiny("sd"), "--controlnet", tiny("controlnet"), "--prompt", "a castle",
                          "--image", files["image"], "--seed", "7"],
    }
    expected = {
        "text-to-image": dict(pipeline="LDMTextToImagePipeline", guidance_scale=2.0, width=32, height=32,
                              num_inference_steps=2, prompt="a painting of a squirrel", negative_prompt=None,
                              safety_checker=None),
        "img2img": dict(pipeline="StableDiffusionImg2ImgPipeline", strength=0.75, width=48, height=32,
                        num_inference_steps=4, seed=1, image=files["image_wide"]),
        "inpainting": dict(pipeline="StableDiffusionInpaintPipeline", width=32, height=32, mask_image=files["mask"],
                           strength=1.0, seed=2),
        "textual-inversion": dict(pipeline="StableDiffusionPipeline", token="<cat-toy>",
                                  learned_embeds=files["embeds"], guidance_scale=7.5),
        "depth-to-image": dict(pipeline="StableDiffusionDepth2ImgPipeline", width=32, height=48, strength=0.8,
                               num_inference_steps=4),
        "unconditional": dict(pipeline="DDPMPipeline", width=32, height=32, prompt=None, seed=6,
                              guidance_scale=None, num_inference_steps=2),
        "controlnet": dict(pipeline="StableDiffusionControlNetPipeline", controlnet=tiny("controlnet"),
                           controlnet_conditioning_scale=1.0, width=32, height=32, strength=None),
    }
    for script, argv in argvs.items():
        task = SCRIPT_TASKS[script]
        odir = tmp_path / task
        code = _run_script(script, [*COMMON, *argv, "--output_dir", odir], monkeypatch)
        captured = capsys.readouterr()
        assert code == 0, captured.err[-3000:]
        assert "saved" in captured.out and "Traceback" not in captured.err
        got = outputs(odir)
        assert got and all(stem.startswith(task) for stem in got)
        names = sorted(p.name for p in odir.iterdir())
        assert names == sorted([s + ".png" for s in got] + [s + ".json" for s in got])  # no temp files
        first_img, first_meta = got[min(got)]
        check_sidecar(first_meta, task=task, dtype="fp32", attention="auto", **expected[task])
        for img, meta in got.values():
            assert img.size == (meta["width"], meta["height"]) and pixels(img).std() > 0
        if task == "text-to-image":
            assert sorted(meta["seed"] for _, meta in got.values()) == [5, 6]
            a, b = (pixels(img) for img, _ in got.values())
            assert not np.array_equal(a, b)  # seeds 5 and 6
    # bad input through a script: one line, exit 2, nothing written
    code = _run_script("text-guide-img-to-img.py", ["--model", tiny("sd"), "--prompt", "x", "--image",
                                                     tmp_path / "nope.png", "--output_dir", tmp_path / "bad"],
                       monkeypatch)
    assert code == 2 and not (tmp_path / "bad").exists()
    assert capsys.readouterr().err.splitlines() == [f"error: --image: image file not found: {tmp_path / 'nope.png'}"]


def test_help_answers_without_importing_torch():
    """The scripts' --help and flag errors must not wait for torch/diffusers: checked in a fresh interpreter,
    the only place where 'was torch imported?' can be asked."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = [{str(SCRIPTS / 'controlnet.py')!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPTS / 'controlnet.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('HEAVY', sorted(m for m in ('torch', 'diffusers', 'transformers', 'PIL') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "--controlnet_conditioning_scale" in done.stdout
