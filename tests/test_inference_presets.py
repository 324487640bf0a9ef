"""Presets (diffusers_npu.presets) and the one tiny-model factory (presets.build_test_pipeline): the SDXL
architectures, and the promise that adding them changed nothing of the existing presets' weights.
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from diffusers_npu import presets

# sha256 of every weight of build_components(name, seed=0) (state dicts in key order, as float64 bytes),
# recorded before the SDXL presets were added. The embedded default model is built from "digits".
WEIGHT_SHA256 = {
    "tiny": "e0b6396665dcd6483b459213a62550e79fc6f6d9a6d8af25641a2c0e7b382ceb",
    "digits": "db00b9c2d4aadc8a3869df4fa3ac7a3319abad2300c01b07c21255fa21da753a",
}


def weights_digest(comps) -> str:
    h = hashlib.sha256()
    for key in ("unet", "vae", "text_encoder"):
        for name, value in sorted(comps[key].state_dict().items()):
            h.update(name.encode())
            h.update(value.detach().to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(WEIGHT_SHA256))
def test_existing_presets_keep_their_exact_weights(name, tmp_path):
    comps = presets.build_components(name, seed=0, tokenizer_dir=str(tmp_path / "tok"))
    assert weights_digest(comps) == WEIGHT_SHA256[name]
    assert set(comps) == {"unet", "vae", "text_encoder", "tokenizer", "noise_scheduler", "preset"}


def test_sdxl_preset_is_the_sdxl_base_architecture():
    """Parameter counts of stabilityai/stable-diffusion-xl-base-1.0, built on the meta device (no memory)."""
    with torch.device("meta"):
        comps = presets.build_components("sdxl", with_tokenizer=False)
    counts = {k: sum(p.numel() for p in comps[k].parameters())
              for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    unet = comps["unet"].config
    assert unet.cross_attention_dim == 768 + 1280 and unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 2816 and list(unet.transformer_layers_per_block) == [1, 2, 10]
    assert comps["vae"].config.scaling_factor == 0.13025 and comps["vae"].config.force_upcast
    assert type(comps["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert presets.get_preset("sdxl").resolution == 1024 and presets.get_preset("sdxl").is_sdxl


def test_sdxl_tiny_is_a_loadable_sdxl_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    comps = presets.build_components("sdxl-tiny", seed=0, tokenizer_dir=str(tmp_path / "tok"))
    folder = presets.save_pipeline_folder(comps, str(tmp_path / "sdxl"))
    index = json.loads((tmp_path / "sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    # both tokenizers are the whole-word tokenizer: every caption word is one token
    ids = pipe.tokenizer_2("a handwritten digit seven").input_ids
    assert len(ids) == 2 + 4 and pipe.tokenizer.get_vocab() == pipe.tokenizer_2.get_vocab()
    unet = pipe.unet.config
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a handwritten digit seven", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0
    # SD presets still save a StableDiffusionPipeline with the DDIM sampler the embedded model always had
    sd = presets.save_pipeline_folder(presets.build_components("tiny", tokenizer_dir=str(tmp_path / "t2")),
                                      str(tmp_path / "sd"))
    sched = json.loads((tmp_path / "sd" / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads(open(os.path.join(sd, "model_index.json")).read())["_class_name"] == "StableDiffusionPipeline"
    assert sched["_class_name"] == "DDIMScheduler" and sched["set_alpha_to_one"] is False


def test_one_factory_builds_every_test_pipeline_kind(tmp_path):
    from diffusers_npu.tiny_pipelines import KINDS

    classes = {
        "sd": "StableDiffusionPipeline", "sd-safety": "StableDiffusionPipeline", "sd-nsfw": "StableDiffusionPipeline",
        "sd-inpaint": "StableDiffusionInpaintPipeline", "sd-depth": "StableDiffusionDepth2ImgPipeline",
        "sd-depth-noest": "StableDiffusionDepth2ImgPipeline", "ldm": "LDMTextToImagePipeline",
        "ddpm": "DDPMPipeline", "sdxl": "StableDiffusionXLPipeline", "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
        "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline", "controlnet": "ControlNetModel",
        "sdxl-controlnet": "ControlNetModel", "dpt": "DPTForDepthEstimation",
        "sd3": "StableDiffusion3Pipeline", "sd3-no-t5": "StableDiffusion3Pipeline",
        "sd3-controlnet": "SD3ControlNetModel", "flux": "FluxPipeline", "flux-controlnet": "FluxControlNetModel",
    }
    assert set(KINDS) == set(classes)
    for kind, cls in classes.items():
        folder = presets.build_test_pipeline(kind, str(tmp_path / kind), seed=1)
        index_path = os.path.join(folder, "model_index.json")
        config = json.load(open(index_path if os.path.exists(index_path) else os.path.join(folder, "config.json")))
        declared = config.get("_class_name") or config.get("architectures", [None])[0]
        assert declared == cls, kind
    unet = json.load(open(tmp_path / "sd-inpaint" / "unet" / "config.json"))
    assert unet["in_channels"] == 9
    refiner = json.load(open(tmp_path / "sdxl-refiner" / "model_index.json"))
    assert refiner["text_encoder"] == [None, None] and refiner["requires_aesthetics_score"] is True
    with pytest.raises(ValueError, match="unknown test pipeline kind 'nope'"):
        presets.build_test_pipeline("nope", str(tmp_path / "nope"))


def test_preset_folders_from_the_command_line(tmp_path, capsys):
    """``python -m diffusers_npu.presets NAME FOLDER`` (what the inference benchmark's JSON tells users to run)
    writes the same weights as build_components."""
    from diffusers import UNet2DConditionModel

    assert presets.main(["tiny", str(tmp_path / "tiny"), "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "tiny"), subfolder="unet")
    reference = presets.build_components("tiny", seed=0, tokenizer_dir=str(tmp_path / "tok"))["unet"]
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reference.state_dict().values()))
    assert presets.main(["tinyy", str(tmp_path / "x")]) == 2
    assert "invalid choice: 'tinyy'" in capsys.readouterr().err and not (tmp_path / "x").exists()
