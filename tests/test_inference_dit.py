"""Inference on the diffusion-transformer families (issue #21 item 8): ``test_infer/text-to-image.py`` and
``controlnet.py`` detect Stable Diffusion 3 and FLUX.1 folders from ``model_index.json``
(``model_folder.model_family``), load their pipelines (and ControlNets), take ``--lora``, and generate.

The tiny pipelines have the component sizes of diffusers' own SD3 / FLUX pipeline tests
(``tiny_pipelines``: ``sd3``, ``flux``, ``sd3-controlnet``, ``flux-controlnet``).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from inference_inputs import COMMON, no_load, outputs, pixels, run_main, save_rgb, tiny
from inference_inputs import one_torch_thread  # noqa: F401 (autouse fixture)

from diffusers_npu import inference
from diffusers_npu.inference import loading

PIPELINES = {"sd3": ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetPipeline", "SD3ControlNetModel"),
             "flux": ("FluxPipeline", "FluxControlNetPipeline", "FluxControlNetModel")}


def save_transformer_lora(pipeline_folder, out_dir, seed: int = 9, rank: int = 4) -> str:
    """LoRA weights for the transformer of an SD3 / FLUX folder as our LoRA training writes them
    (``pytorch_lora_weights.safetensors`` through the pipeline class's ``save_lora_weights``); lora_B random,
    not zero, so the adapter changes the output."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with open(os.path.join(pipeline_folder, "model_index.json"), encoding="utf-8") as f:
        cls = getattr(diffusers, json.load(f)["_class_name"])
    model_cls = diffusers.FluxTransformer2DModel if cls is diffusers.FluxPipeline else diffusers.SD3Transformer2DModel
    transformer = model_cls.from_pretrained(pipeline_folder, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    cls.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return str(out_dir)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_folders_generate_with_lora_and_controlnet(family, tmp_path, capsys):
    """One tiny model per family: text-to-image picks the family's pipeline (sidecar), a LoRA changes the
    image and scale 0 gives the base image back, and the ControlNet task loads the family's ControlNet
    class into its ControlNet pipeline, whose conditioning image changes the result."""
    t2i_class, cn_pipeline, cn_class = PIPELINES[family]
    model = tiny(family)
    lora = save_transformer_lora(model, tmp_path / "lora")
    base = [*COMMON, "--model", model, "--prompt", "a photo of sks dog", "--seed", "3", "--height", "32",
            "--width", "32"]
    runs = {"base": [], "lora": ["--lora", lora], "lora0": ["--lora", lora, "--lora_scale", "0"]}
    images = {}
    for name, extra in runs.items():
        out = tmp_path / name
        rc, _, err = run_main("text-to-image", [*base, *extra, "--output_dir", out], capsys)
        assert rc == 0, err
        assert f"loaded {t2i_class} from {model}" in err
        ((img, meta),) = outputs(out).values()
        assert meta["pipeline"] == t2i_class and img.size == (32, 32)
        images[name] = pixels(img)
    assert np.abs(images["lora"] - images["base"]).mean() > 1.0  # the adapter changed the image
    assert np.abs(images["lora0"] - images["base"]).max() <= 1  # scale 0: the base model's image

    cond = [save_rgb(tmp_path / f"cond{i}.png", seed=i) for i in range(2)]
    controlnet = tiny(f"{family}-controlnet")
    cn_images = []
    for i, image in enumerate(cond):
        out = tmp_path / f"cn{i}"
        rc, _, err = run_main("controlnet", [*base, "--controlnet", controlnet, "--image", image, "--output_dir", out],
                              capsys)
        assert rc == 0, err
        ((img, meta),) = outputs(out).values()
        assert meta["pipeline"] == cn_pipeline and meta["controlnet"] == controlnet
        cn_images.append(pixels(img))
    if family == "flux":  # the conditioning image steers the transformer
        assert np.abs(cn_images[0] - cn_images[1]).mean() > 1.0
    # (the tiny sd3 transformer has diffusers' test size, one block, which is context-pre-only: SD3 adds
    # ControlNet residuals only to the other blocks, so its output cannot depend on the conditioning image)
    with open(os.path.join(controlnet, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["_class_name"] == cn_class


def _plan(task, **flags):
    args = argparse.Namespace(task=task, device="cpu", num_inference_steps=4, seed=0, output_dir="unused", **flags)
    return inference.prepare(args)


def test_family_picks_the_pipeline_class_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    """Before any weights load (load_pipeline is not called): each task's class for SD3 / FLUX folders, the
    ControlNet's class from its config, a ControlNet of another family or width and a task without an
    SD3 / FLUX pipeline are one-line errors naming the flag."""
    monkeypatch.setattr(loading, "load_pipeline", no_load)
    image = save_rgb(tmp_path / "image.png")
    mask = save_rgb(tmp_path / "mask.png", seed=1)
    sd3, flux = tiny("sd3"), tiny("flux")
    expected = {("img2img", sd3): "StableDiffusion3Img2ImgPipeline", ("img2img", flux): "FluxImg2ImgPipeline",
                ("inpainting", sd3): "StableDiffusion3InpaintPipeline", ("inpainting", flux): "FluxInpaintPipeline"}
    for (task, model), cls in expected.items():
        plan = _plan(task, model=model, prompt="a cat", image=image, mask_image=mask if task == "inpainting" else None)
        assert plan.pipeline_class.__name__ == cls and plan.metadata["pipeline"] == cls
    plan = _plan("controlnet", model=flux, prompt="a cat", image=image, controlnet=tiny("flux-controlnet"))
    assert plan.controlnet_class == "FluxControlNetModel" and "control_image" in plan.call_kwargs
    assert "image" not in plan.call_kwargs

    with pytest.raises(inference.InputError, match=r"--controlnet: .* is a FLUX.1 ControlNet .* Stable Diffusion 3"):
        _plan("controlnet", model=sd3, prompt="a cat", image=image, controlnet=tiny("flux-controlnet"))
    with pytest.raises(inference.InputError, match=r"--controlnet: .* is a Stable Diffusion 1.x/2.x ControlNet"):
        _plan("controlnet", model=flux, prompt="a cat", image=image, controlnet=tiny("controlnet"))
    narrow = tmp_path / "narrow-cn"
    narrow.mkdir()
    config = json.loads(open(os.path.join(tiny("sd3-controlnet"), "config.json"), encoding="utf-8").read())
    (narrow / "config.json").write_text(json.dumps(dict(config, joint_attention_dim=64)))
    (narrow / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(inference.InputError, match="--controlnet: .* has joint_attention_dim 64 but the transformer"):
        _plan("controlnet", model=sd3, prompt="a cat", image=image, controlnet=str(narrow))
    with pytest.raises(inference.UsageError, match=r"--model: .* is a FLUX.1 pipeline; the depth-to-image task does "
                                                   r"not support it \(tasks that do: text-to-image, img2img"):
        _plan("depth-to-image", model=flux, prompt="a cat", image=image)
