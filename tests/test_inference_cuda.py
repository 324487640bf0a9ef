"""Inference on a CUDA device in half precision (skipped without a GPU): every task, SDXL, ControlNet, LoRA
and the refiner; fp32 CUDA against fp32 CPU (the CPU generator makes the noise identical); --compile (slow,
opt-in)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from inference_inputs import (outputs, pixels, run_main, save_learned_embeds, save_lora, save_mask, save_rgb,
                              tiny)
from inference_inputs import one_torch_thread  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-inputs")
    return {
        "image": save_rgb(root / "image.png"),
        "mask": save_mask(root / "mask.png"),
        "embeds": save_learned_embeds(root / "learned_embeds.safetensors"),
        "lora": save_lora(tiny("sdxl"), root / "lora"),
    }


def _finite_nonblank(img):
    return pixels(img).std() > 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_every_task_half_precision(tmp_path, files, capsys, dtype):
    f = files
    runs = {
        "text-to-image": ["--model", tiny("sd-safety"), "--prompt", "a cat", "--attention", "flash"],
        "img2img": ["--model", tiny("sd"), "--prompt", "a cat", "--image", f["image"], "--strength", "1"],
        "inpainting": ["--model", tiny("sd-inpaint"), "--prompt", "a cat", "--image", f["image"], "--mask_image",
                       f["mask"]],
        "textual-inversion": ["--model", tiny("sd"), "--prompt", "a <cat-toy>", "--learned_embeds", f["embeds"]],
        "depth-to-image": ["--model", tiny("sd-depth"), "--prompt", "a cat", "--image", f["image"], "--strength", "1"],
        "unconditional": ["--model", tiny("ddpm")],
        "controlnet": ["--model", tiny("sdxl"), "--controlnet", tiny("sdxl-controlnet"), "--prompt", "a cat",
                       "--image", f["image"]],
        "ldm": ["--model", tiny("ldm"), "--prompt", "a cat"],
        "sdxl": ["--model", tiny("sdxl"), "--prompt", "a cat", "--lora", f["lora"], "--refiner", tiny("sdxl-refiner"),
                 "--num_inference_steps", "4"],
    }
    for name, argv in runs.items():
        task = {"ldm": "text-to-image", "sdxl": "text-to-image"}.get(name, name)
        out = tmp_path / name
        rc, _, err = run_main(task, ["--device", "cuda", "--dtype", dtype, "--num_inference_steps", "2", "--seed", "0",
                                     "--output_dir", out, *argv], capsys)
        assert rc == 0, (name, err[-2000:])
        (img, meta), = outputs(out).values()
        assert meta["device"] == "cuda" and meta["dtype"] == dtype and _finite_nonblank(img), name


def test_cuda_fp32_matches_cpu(tmp_path, capsys):
    """The CPU generator gives the same noise on every device: CUDA fp32 ~= CPU fp32."""
    for kind in ("sd", "sdxl"):
        base = ["--dtype", "fp32", "--num_inference_steps", "2", "--seed", "3", "--model", tiny(kind),
                "--prompt", "a cat", "--attention", "default"]
        assert run_main("text-to-image", [*base, "--device", "cpu", "--output_dir", tmp_path / f"{kind}-cpu"],
                        capsys)[0] == 0
        assert run_main("text-to-image", [*base, "--device", "cuda", "--output_dir", tmp_path / f"{kind}-gpu"],
                        capsys)[0] == 0
        (a, _), = outputs(tmp_path / f"{kind}-cpu").values()
        (b, _), = outputs(tmp_path / f"{kind}-gpu").values()
        diff = np.abs(pixels(a) - pixels(b))
        print(f"{kind}: cpu vs cuda fp32: max |diff| {diff.max()}, mean {diff.mean():.3f} (0-255 levels)")
        assert diff.mean() < 2.0 and diff.max() <= 16


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIFFUSERS_NPU_SLOW_TESTS"),
                    reason="max-autotune takes minutes even for the tiny UNet (over 200 s on an H100); "
                    "set DIFFUSERS_NPU_SLOW_TESTS=1")
def test_cuda_compile(tmp_path, capsys):
    out = tmp_path / "compiled"
    start = time.perf_counter()
    rc, _, err = run_main("text-to-image", ["--device", "cuda", "--dtype", "fp16", "--num_inference_steps", "2",
                                            "--seed", "0", "--num_images", "3", "--model", tiny("sd"),
                                            "--prompt", "a cat", "--compile", "--output_dir", out], capsys)
    assert rc == 0, err[-3000:]
    files = outputs(out)
    assert len(files) == 3 and all(meta["compile"] for _, meta in files.values())
    secs = [meta["seconds"] for _, meta in sorted(files.values(), key=lambda f: f[1]["index"])]
    print(f"--compile on cuda: per-image seconds {secs}, total {time.perf_counter() - start:.1f}s")
