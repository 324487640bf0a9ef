"""The task table: one :class:`TaskSpec` per inference task, read by the CLI (which flags exist), the plan
(what is required, which pipeline class) and the docs.

Adding a task is one entry here plus its thin script in ``test_infer/``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import UsageError

DTYPES = ("fp32", "fp16", "bf16")
ATTENTION_MODES = ("auto", "flash", "upcast", "default")  # == diffusers_npu.attention.ATTENTION_MODES
DEVICES = ("auto", "npu", "cuda", "cpu")

_CHANNEL_KINDS = {4: "a text-to-image/img2img model", 5: "a depth-to-image model", 9: "an inpainting model"}


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs and offers. A ``*_class`` of None: the class model_index.json declares (SD) or the
    task does not support that family (SDXL, SD3, FLUX; see :meth:`class_for`)."""

    name: str
    script: str
    default_model: str
    description: str
    pipeline_class: Optional[str] = None
    sdxl_class: Optional[str] = None
    unet_in_channels: Tuple[int, ...] = ()  # accepted UNet input channels for SD folders (empty: any)
    sdxl_unet_in_channels: Tuple[int, ...] = ()
    sd3_class: Optional[str] = None  # Stable Diffusion 3 / 3.5 folders
    flux_class: Optional[str] = None  # FLUX.1 folders
    text: bool = True  # --prompt / --negative_prompt / --guidance_scale
    image: bool = False  # --image
    mask: bool = False  # --mask_image
    strength: bool = False  # --strength
    size: bool = True  # --height / --width
    safety: bool = True  # --disable_safety_checker
    depth: bool = False  # --depth_map / --depth_estimator
    embeds: bool = False  # --learned_embeds / --token
    lora: bool = False  # --lora / --lora_scale
    controlnet: bool = False  # --controlnet / --controlnet_conditioning_scale
    refiner: bool = False  # --refiner / --high_noise_frac
    image_help: str = "input image (required): a local file or an http(s) URL"
    example: str = ""  # extra flags of the help's example command
    example_prompt: str = "a photo of an astronaut riding a horse on mars"

    @property
    def aliases(self) -> tuple:
        """Other names of the task: its script's name, and the underscore spelling training uses."""
        names = (os.path.splitext(self.script)[0], self.name.replace("-", "_"))
        return tuple(dict.fromkeys(n for n in names if n != self.name))

    def class_for(self, family: Optional[str]) -> Optional[str]:
        """The pipeline class this task loads for a model family (``model_folder.model_family``): the SDXL /
        SD3 / FLUX class, or for SD and unknown families the task's class (None: model_index.json's)."""
        return {"sdxl": self.sdxl_class, "sd3": self.sd3_class, "flux": self.flux_class}.get(family,
                                                                                             self.pipeline_class)

    def channel_error(self, folder: str, channels: int, sdxl: bool) -> Optional[str]:
        """The message for a UNet with ``channels`` inputs if this task cannot use it, else None."""
        allowed = self.sdxl_unet_in_channels if sdxl else self.unet_in_channels
        if not allowed or channels in allowed:
            return None
        needs = " or ".join(f"{c} ({_CHANNEL_KINDS.get(c, 'an unusual model')})" for c in allowed)
        return (f"--model: {folder} has a UNet with {channels} input channels "
                f"({_CHANNEL_KINDS.get(channels, 'an unusual model')}); the {self.name} task needs {needs}")


TASKS: Dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "text-to-image", "text-to-image.py", "CompVis/ldm-text2im-large-256",
            "Generate images from a text prompt with any text-to-image pipeline (LDM text2im, Stable "
            "Diffusion, Stable Diffusion XL, Stable Diffusion 3 / 3.5, FLUX.1, ...): the class model_index.json "
            "declares is loaded (StableDiffusion3Pipeline / FluxPipeline for SD3 / FLUX folders). SDXL can "
            "finish with a refiner (--refiner).",
            sdxl_class="StableDiffusionXLPipeline", sd3_class="StableDiffusion3Pipeline", flux_class="FluxPipeline",
            lora=True, refiner=True,
            example_prompt="A painting of a squirrel eating a burger",
        ),
        TaskSpec(
            "img2img", "text-guide-img-to-img.py", "nitrosocke/Ghibli-Diffusion",
            "Text-guided image-to-image: re-draw --image following --prompt (StableDiffusionImg2ImgPipeline, "
            "or StableDiffusionXLImg2ImgPipeline for SDXL folders, refiners included; "
            "StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline for SD3 / FLUX folders).",
            pipeline_class="StableDiffusionImg2ImgPipeline", sdxl_class="StableDiffusionXLImg2ImgPipeline",
            sd3_class="StableDiffusion3Img2ImgPipeline", flux_class="FluxImg2ImgPipeline",
            unet_in_channels=(4,), sdxl_unet_in_channels=(4,), image=True, strength=True, lora=True,
            example=" --image sketch.png --strength 0.75",
            example_prompt="ghibli style, a fantasy landscape with castles",
        ),
        TaskSpec(
            "inpainting", "text-guide-image-inpainting.py", "runwayml/stable-diffusion-inpainting",
            "Text-guided inpainting: repaint the white part of --mask_image in --image following --prompt "
            "(StableDiffusionInpaintPipeline, which needs an inpainting model whose UNet has 9 input channels; "
            "StableDiffusionXLInpaintPipeline for SDXL folders, with 9 or 4 input channels; "
            "StableDiffusion3InpaintPipeline / FluxInpaintPipeline for SD3 / FLUX folders).",
            pipeline_class="StableDiffusionInpaintPipeline", sdxl_class="StableDiffusionXLInpaintPipeline",
            sd3_class="StableDiffusion3InpaintPipeline", flux_class="FluxInpaintPipeline",
            unet_in_channels=(9,), sdxl_unet_in_channels=(9, 4), image=True, mask=True, strength=True, lora=True,
            example=" --image photo.png --mask_image mask.png",
            example_prompt="Face of a yellow cat, high resolution, sitting on a park bench",
        ),
        TaskSpec(
            "textual-inversion", "textual-inversion.py", "runwayml/stable-diffusion-v1-5",
            "Text-to-image with a textual-inversion embedding: --learned_embeds adds a new token to the "
            "tokenizer; use it in --prompt (StableDiffusionPipeline).",
            pipeline_class="StableDiffusionPipeline", unet_in_channels=(4,), embeds=True, lora=True,
            example=" --learned_embeds path/to/learned_embeds.safetensors",
            example_prompt="a grafitti in a favela wall with a <cat-toy> on it",
        ),
        TaskSpec(
            "depth-to-image", "text-guide-depth-to-image.py", "stabilityai/stable-diffusion-2-depth",
            "Text-guided depth-to-image: re-draw --image following --prompt while keeping its depth "
            "(StableDiffusionDepth2ImgPipeline). The depth comes from the model's depth estimator, from "
            "--depth_estimator, or from --depth_map.",
            pipeline_class="StableDiffusionDepth2ImgPipeline", unet_in_channels=(5,), image=True, strength=True,
            depth=True, lora=True, example=" --image photo.png --strength 0.7", example_prompt="two tigers",
        ),
        TaskSpec(
            "unconditional", "unconditional-image-generation.py", "anton-l/ddpm-butterflies-128",
            "Unconditional image generation (DDPM and other unconditional pipelines; the class "
            "model_index.json declares is loaded). The image size is the model's.",
            text=False, size=False, safety=False,
        ),
        TaskSpec(
            "controlnet", "controlnet.py", "runwayml/stable-diffusion-v1-5",
            "Text-to-image guided by a ControlNet and its conditioning image (edges, pose, depth, ... as the "
            "ControlNet was trained): StableDiffusionControlNetPipeline, or StableDiffusionXLControlNetPipeline "
            "for SDXL folders and SDXL ControlNets, StableDiffusion3ControlNetPipeline (SD3ControlNetModel) "
            "and FluxControlNetPipeline (FluxControlNetModel) for SD3 and FLUX.1.",
            pipeline_class="StableDiffusionControlNetPipeline", sdxl_class="StableDiffusionXLControlNetPipeline",
            sd3_class="StableDiffusion3ControlNetPipeline", flux_class="FluxControlNetPipeline",
            unet_in_channels=(4,), sdxl_unet_in_channels=(4,), image=True, controlnet=True, lora=True,
            image_help="the conditioning image (required): a local file or an http(s) URL, resized to the output",
            example=" --controlnet path/to/controlnet --image edges.png",
            example_prompt="a red castle on a hill",
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a task or script name (``text-guide-img-to-img`` = ``img2img``; ``_`` and
    ``-`` are the same: ``text_to_image`` = ``text-to-image``)."""
    key = os.path.splitext(os.path.basename(str(name)))[0]
    for candidate in (key, key.replace("_", "-")):
        if candidate in TASKS:
            return TASKS[candidate]
        for spec in TASKS.values():
            if candidate in spec.aliases:
                return spec
    raise UsageError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


__all__ = ["ATTENTION_MODES", "DEVICES", "DTYPES", "TASKS", "TaskSpec", "get_task"]
