"""Tiny, randomly initialised diffusers pipelines for offline tests.

Every builder constructs its components from configs (no download, no hub access), seeds torch so the
weights are the same on every run, and writes the pipeline with ``save_pretrained`` into ``folder``, so
the result is a local folder with a ``model_index.json`` that ``DiffusionPipeline.from_pretrained`` can
load -- exactly what a user would point ``--model`` at.

Sizes are chosen for speed on a 2-core CPU: 32x32 pixel images, UNets with block_out_channels (32, 64)
and one layer per block, 2-layer text encoders with hidden size 32.

Tokenizers: a byte-level CLIP BPE vocabulary (every byte as a token, with and without the ``</w>``
end-of-word suffix, plus the two special tokens; no merges) is written as ``vocab.json`` + ``merges.txt``
and loaded with ``CLIPTokenizer.from_pretrained`` -- that file pair is what both transformers 4 (slow
tokenizer) and transformers 5 (tokenizers backend, which ignores ``vocab_file=`` keyword arguments) read.
The LDM pipeline uses a BERT word-piece tokenizer built the same way from a ``vocab.txt``.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

SIZE = 32  # default image side of every tiny pipeline
TEXT_DIM = 32  # text-encoder hidden size == UNet cross_attention_dim

WORDS = [
    "a", "an", "the", "of", "photo", "painting", "cat", "dog", "toy", "in", "on", "style", "red", "blue",
    "castle", "forest", "house", "sky", "tree", "butterfly", "portrait", "landscape", "with", "and",
]


# ----------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode():
    """The GPT-2/CLIP byte -> printable-unicode table (written out here, not imported)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_tokenizer(workdir: str):
    """A CLIPTokenizer with a byte-level vocabulary (about 514 tokens), model_max_length 77."""
    from transformers import CLIPTokenizer

    src = os.path.join(workdir, "clip-tokenizer-src")
    os.makedirs(src, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(src, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(src, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(src, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77}, f)
    return CLIPTokenizer.from_pretrained(src, model_max_length=77)


def bert_tokenizer(workdir: str):
    """A BertTokenizer over a tiny word-piece vocabulary (special tokens, letters, a few words)."""
    from transformers import BertTokenizer

    src = os.path.join(workdir, "bert-tokenizer-src")
    os.makedirs(src, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list("abcdefghijklmnopqrstuvwxyz0123456789-<>")
    tokens += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789-<>"]
    tokens += [w for w in WORDS if w not in tokens]
    with open(os.path.join(src, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return BertTokenizer.from_pretrained(src, model_max_length=77)


# ----------------------------------------------------------------------------------------- components
def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=SIZE,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def _safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
        vision_config=dict(
            hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
            image_size=SIZE, patch_size=8,
        ),
        projection_dim=TEXT_DIM,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return StableDiffusionSafetyChecker(config).eval(), processor


def _sd_parts(workdir: str, unet_in_channels: int = 4):
    tokenizer = clip_tokenizer(workdir)
    return dict(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(unet_in_channels),
        scheduler=_scheduler(),
    )


# ------------------------------------------------------------------------------------------ pipelines
def _save(pipe, folder: str) -> str:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_text2img(folder: str, with_safety_checker: bool = True, seed: int = 0) -> str:
    """StableDiffusionPipeline. With ``with_safety_checker`` a tiny CLIP safety checker is included."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work:
        parts = _sd_parts(work)
        if with_safety_checker:
            checker, processor = _safety_checker()
        else:
            checker, processor = None, None
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=checker, feature_extractor=processor,
            requires_safety_checker=with_safety_checker,
        )
        return _save(pipe, folder)


def build_img2img(folder: str, seed: int = 1) -> str:
    """StableDiffusionImg2ImgPipeline without a safety checker."""
    from diffusers import StableDiffusionImg2ImgPipeline

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work:
        pipe = StableDiffusionImg2ImgPipeline(
            **_sd_parts(work), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        return _save(pipe, folder)


def build_inpaint(folder: str, seed: int = 2) -> str:
    """StableDiffusionInpaintPipeline (UNet with 9 input channels: latents + mask + masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work:
        pipe = StableDiffusionInpaintPipeline(
            **_sd_parts(work, unet_in_channels=9), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        return _save(pipe, folder)


def tiny_depth_estimator():
    """A tiny DPTForDepthEstimation (plain ViT backbone, 4 layers) and its DPTImageProcessor."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=TEXT_DIM,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=SIZE,
        patch_size=8,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=(8, 16, 32, 32),
        fusion_hidden_size=16,
        reassemble_factors=(4, 2, 1, 0.5),
        is_hybrid=False,
        use_auxiliary_head=False,
        head_in_index=-1,
    )
    model = DPTForDepthEstimation(config).eval()
    # With initializer_range 0.02 the random head predicts depths of ~1e-9, which underflow to a constant 0
    # in fp16 (and a constant depth map normalises to NaN). Give the head PyTorch's default init and a
    # positive bias so the depth is O(1) and varies in every dtype, as a trained DPT's does.
    with torch.no_grad():
        for layer in model.head.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.reset_parameters()
        model.head.head[-2].bias.fill_(1.0)
    processor = DPTImageProcessor(
        size={"height": SIZE, "width": SIZE}, keep_aspect_ratio=False, do_rescale=True, do_normalize=True
    )
    return model, processor


def build_depth2img(folder: str, with_depth_estimator: bool = True, seed: int = 3) -> str:
    """StableDiffusionDepth2ImgPipeline (UNet with 5 input channels: latents + depth).

    With ``with_depth_estimator=False`` the folder has no depth_estimator / feature_extractor, so it can
    only be run with an explicit depth map (``--depth_map``) or ``--depth_estimator``.
    """
    from diffusers import StableDiffusionDepth2ImgPipeline

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work:
        parts = _sd_parts(work, unet_in_channels=5)
        if with_depth_estimator:
            estimator, processor = tiny_depth_estimator()
        else:
            estimator, processor = None, None
        pipe = StableDiffusionDepth2ImgPipeline(**parts, depth_estimator=estimator, feature_extractor=processor)
        return _save(pipe, folder)


def save_depth_estimator(folder: str, seed: int = 4) -> str:
    """Write a tiny DPT depth estimator + processor as a standalone folder (for ``--depth_estimator``)."""
    torch.manual_seed(seed)
    model, processor = tiny_depth_estimator()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_ldm_text2im(folder: str, seed: int = 5) -> str:
    """LDMTextToImagePipeline as in CompVis/ldm-text2im-large-256: LDMBert + VQModel + UNet2DConditionModel.

    The pipeline always samples latents at height // 8, so the VQ-VAE has four levels (scale factor 8).
    """
    from diffusers import LDMTextToImagePipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = bert_tokenizer(work)
        bert = LDMBertModel(
            LDMBertConfig(
                vocab_size=len(tokenizer), max_position_embeddings=77, encoder_layers=2, encoder_ffn_dim=37,
                encoder_attention_heads=2, head_dim=16, d_model=TEXT_DIM,
            )
        ).eval()
        vqvae = VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            num_vq_embeddings=64,
            sample_size=SIZE,
        )
        unet = UNet2DConditionModel(
            sample_size=SIZE // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=(2, 4),
        )
        pipe = LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=_scheduler())
        return _save(pipe, folder)


def build_ddpm(folder: str, seed: int = 6) -> str:
    """DDPMPipeline with a tiny UNet2DModel (32x32 RGB, like anton-l/ddpm-butterflies-128 but smaller)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    return _save(pipe, folder)


# ------------------------------------------------------------------------------------------- inputs
def save_rgb(path: str, size=(SIZE, SIZE), seed: int = 0) -> str:
    """A deterministic random RGB PNG of ``size`` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def save_mask(path: str, size=(SIZE, SIZE)) -> str:
    """A black mask with a white (repaint) square in the middle."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", size, 0)
    w, h = size
    ImageDraw.Draw(mask).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=255)
    mask.save(path)
    return path


def save_depth(path: str, size=(SIZE, SIZE)) -> str:
    """A horizontal gradient as a grayscale depth map."""
    import numpy as np
    from PIL import Image

    row = np.linspace(0, 255, size[0], dtype=np.float32)
    Image.fromarray(np.tile(row, (size[1], 1)).astype(np.uint8), mode="L").save(path)
    return path


def save_learned_embeds(path: str, token: str = "<cat-toy>", n_vectors: int = 2, seed: int = 7) -> str:
    """Our training format: ``learned_embeds.safetensors`` = {token: tensor[n_vectors, dim]}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({token: torch.randn(n_vectors, TEXT_DIM, generator=g)}, path)
    return path


def save_concept_folder(folder: str, token: str = "<tiny-concept>", seed: int = 8) -> str:
    """The sd-concepts-library layout: learned_embeds.bin ({token: tensor[dim]}) + token_identifier.txt."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    torch.save({token: torch.randn(TEXT_DIM, generator=g)}, os.path.join(folder, "learned_embeds.bin"))
    with open(os.path.join(folder, "token_identifier.txt"), "w", encoding="utf-8") as f:
        f.write(token + "\n")
    with open(os.path.join(folder, "type_of_concept.txt"), "w", encoding="utf-8") as f:
        f.write("object\n")
    return folder


BUILDERS = {
    "text-to-image": build_text2img,
    "ldm": build_ldm_text2im,
    "img2img": build_img2img,
    "inpainting": build_inpaint,
    "depth-to-image": build_depth2img,
    "unconditional": build_ddpm,
}


if __name__ == "__main__":  # python tests/tiny_pipelines.py OUTDIR -- build all for manual tries
    import sys
    import time

    out = sys.argv[1] if len(sys.argv) > 1 else "tiny-pipelines"
    for name, build in BUILDERS.items():
        t = time.time()
        build(os.path.join(out, name))
        print(f"{name}: {time.time() - t:.1f}s")
