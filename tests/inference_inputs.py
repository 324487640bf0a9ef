"""Small input files for the inference tests: images, masks, depth maps, textual-inversion embeddings and
LoRA weights. The tiny pipelines themselves come from :func:`diffusers_npu.presets.build_test_pipeline`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread per test module (import it into the module): on a shared 2-core machine multi-threaded
    kernels on 32x32 images are 20-50x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_rgb(path, size=(SIZE, SIZE), seed: int = 0) -> str:
    """A deterministic random RGB PNG of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def save_mask(path, size=(SIZE, SIZE)) -> str:
    """A black mask with a white (repaint) square in the middle."""
    mask = Image.new("L", size, 0)
    w, h = size
    ImageDraw.Draw(mask).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=255)
    mask.save(path)
    return str(path)


def save_depth(path, size=(SIZE, SIZE)) -> str:
    """A horizontal gradient as a grayscale depth map."""
    row = np.linspace(0, 255, size[0], dtype=np.float32)
    Image.fromarray(np.tile(row, (size[1], 1)).astype(np.uint8), mode="L").save(path)
    return str(path)


def save_learned_embeds(path, token: str = "<cat-toy>", n_vectors: int = 2, dim: int = 32, seed: int = 7) -> str:
    """Our training format: ``learned_embeds.safetensors`` = {token: tensor[n_vectors, dim]}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({token: torch.randn(n_vectors, dim, generator=g)}, str(path))
    return str(path)


def save_concept_folder(folder, token: str = "<tiny-concept>", dim: int = 32, seed: int = 8) -> str:
    """The sd-concepts-library layout: learned_embeds.bin ({token: tensor[dim]}) + token_identifier.txt."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.save({token: torch.randn(dim, generator=g)}, os.path.join(folder, "learned_embeds.bin"))
    with open(os.path.join(folder, "token_identifier.txt"), "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return str(folder)


def save_lora(pipeline_folder, out_dir, seed: int = 9, rank: int = 4) -> str:
    """LoRA weights for the UNet of ``pipeline_folder`` in the layout our LoRA training writes
    (``pytorch_lora_weights.safetensors`` through the pipeline class's ``save_lora_weights``). lora_B is
    random, not zero, so the adapter changes the output."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with open(os.path.join(pipeline_folder, "model_index.json"), encoding="utf-8") as f:
        cls = getattr(diffusers, json.load(f)["_class_name"])
    unet = UNet2DConditionModel.from_pretrained(pipeline_folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    cls.save_lora_weights(str(out_dir), unet_lora_layers=get_peft_model_state_dict(unet))
    return str(out_dir)


def write_training_info(folder, base_model, kind: str, task: str = "text_to_image") -> str:
    """The ``training_info.json`` the trainer writes beside outputs that are not full pipelines."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "training_info.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"base_model": str(base_model), "task": task, "kind": kind}, f)
    return path


# ------------------------------------------------------------------------- tiny pipelines, built once
_ROOT = None
_BUILT = {}


def tiny(kind: str) -> str:
    """The folder of the tiny test pipeline ``kind`` (see diffusers_npu.tiny_pipelines.KINDS), built on first
    use and shared by every test module of this process."""
    global _ROOT
    if kind not in _BUILT:
        import atexit
        import shutil
        import tempfile

        from diffusers_npu.presets import build_test_pipeline
        from diffusers_npu.tiny_pipelines import KINDS

        if _ROOT is None:
            _ROOT = tempfile.mkdtemp(prefix="dnpu-tiny-pipelines-")
            atexit.register(shutil.rmtree, _ROOT, True)
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):  # save_pretrained's progress bars are not the test's output
            _BUILT[kind] = build_test_pipeline(kind, os.path.join(_ROOT, kind), seed=KINDS.index(kind))  # fixed per kind
    return _BUILT[kind]


def run_main(task, argv, capsys=None):
    """diffusers_npu.inference.main in-process; returns (rc, stdout, stderr)."""
    from diffusers_npu import inference

    rc = inference.main(task, [str(a) for a in argv])
    if capsys is None:
        return rc, "", ""
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def outputs(folder):
    """{stem: (PIL image, sidecar dict)} for the PNGs in folder."""
    from pathlib import Path

    result = {}
    for png in sorted(Path(folder).glob("*.png")):
        with Image.open(png) as img:
            img.load()
            result[png.stem] = (img.copy(), json.loads(png.with_suffix(".json").read_text()))
    return result


def pixels(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def no_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded for invalid input")


COMMON = ["--device", "cpu", "--num_inference_steps", "2"]
