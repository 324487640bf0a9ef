"""Tiny random-weight pipelines for tests and smoke runs: the one factory (reached as
:func:`diffusers_npu.presets.build_test_pipeline`).

Every kind is built from the ``tiny`` / ``sdxl-tiny`` preset configs of :mod:`diffusers_npu.presets` (plus
the few extra parts a kind needs: a 9-channel inpainting UNet, a depth estimator, a safety checker, ...),
seeded, and written with ``save_pretrained`` into a folder -- exactly what a user points ``--model`` (or
``--controlnet``, ``--refiner``, ``--depth_estimator``) at. Nothing is downloaded. Sizes are chosen for
speed on a 2-core CPU: 32x32 pixel images, UNets with (32, 64) channels and one layer per block.

Kinds (:data:`KINDS`):

=================== ============================================================================
sd                  StableDiffusionPipeline, no safety checker (img2img, textual inversion, LoRA)
sd-safety           ... with a tiny CLIP safety checker whose thresholds never flag an image
sd-nsfw             ... with a safety checker whose thresholds flag every image
sd-inpaint          StableDiffusionInpaintPipeline (UNet with 9 input channels)
sd-depth            StableDiffusionDepth2ImgPipeline (5 channels) with a tiny DPT depth estimator
sd-depth-noest      the same without depth estimator (needs --depth_map or --depth_estimator)
ldm                 LDMTextToImagePipeline (LDMBert + VQModel), the original text-to-image script's kind
ddpm                DDPMPipeline (unconditional)
sdxl                StableDiffusionXLPipeline (the ``sdxl-tiny`` preset)
sdxl-inpaint        StableDiffusionXLInpaintPipeline (9-channel UNet)
sdxl-refiner        StableDiffusionXLImg2ImgPipeline like the SDXL refiner: text encoder 2 only,
                    aesthetic-score time ids
controlnet          a ControlNetModel folder for ``sd`` (diffusers' ``from_unet``, non-zero outputs)
sdxl-controlnet     a ControlNetModel folder for ``sdxl``
dpt                 a DPTForDepthEstimation folder with its image processor (``--depth_estimator``)
sd3                 StableDiffusion3Pipeline, diffusers' own pipeline-test sizes (two CLIP encoders, T5)
sd3-no-t5           the same without tokenizer_3 / text_encoder_3 (SD3 runs without T5 at inference)
sd3-controlnet      an SD3ControlNetModel folder matching ``sd3`` (StableDiffusion3ControlNetPipeline loads it;
                    SD3 adds ControlNet residuals only before its last block, so with ``sd3``'s one block
                    it does not change the image)
flux                FluxPipeline, diffusers' own pipeline-test sizes (CLIP + T5, 1-channel latents packed 2x2)
flux-controlnet     a FluxControlNetModel folder for ``flux`` (non-zero outputs)
=================== ============================================================================

The SD3 and FLUX kinds use the component sizes of diffusers' pipeline tests
(``tests/pipelines/stable_diffusion_3`` and ``tests/pipelines/flux``: ``get_dummy_components``) with this
project's offline tokenizers (a whole-word CLIP tokenizer, a Unigram T5 tokenizer) instead of the Hub's
``hf-internal-testing`` ones.
"""
from __future__ import annotations

import os
import tempfile

SIZE = 32  # image side of every tiny pipeline (the tiny presets' resolution)


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _sd_components(preset: str, seed: int, work: str, unet_in_channels: int = 4, **unet_changes) -> dict:
    """A preset's components; a UNet with other input channels (inpainting, depth) where asked."""
    from diffusers import UNet2DConditionModel

    from .presets import build_components, inference_scheduler_for

    comps = build_components(preset, seed=seed, tokenizer_dir=os.path.join(work, "tokenizer"))
    if unet_in_channels != 4 or unet_changes:
        comps["unet"] = UNet2DConditionModel(**dict(comps["preset"].unet, in_channels=unet_in_channels,
                                                     **unet_changes))
    comps["scheduler"] = inference_scheduler_for(comps)
    return comps


def _sd_kwargs(comps: dict) -> dict:
    return {k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}


def _sdxl_kwargs(comps: dict) -> dict:
    kw = _sd_kwargs(comps)
    kw.update(text_encoder_2=comps["text_encoder_2"], tokenizer_2=comps["tokenizer_2"], add_watermarker=False)
    return kw


def tiny_safety_checker(flag_everything: bool):
    """A tiny StableDiffusionSafetyChecker and its image processor.

    The checker flags an image when the cosine similarity of its embedding to a concept embedding exceeds that
    concept's threshold. Cosines lie in [-1, 1], so thresholds of -10 flag every image and +10 none: the
    outcome is known, whatever the random weights.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    layer = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    config = CLIPConfig(text_config=layer, vision_config=dict(layer, image_size=SIZE, patch_size=8),
                        projection_dim=32)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        threshold = -10.0 if flag_everything else 10.0
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return checker, processor


def tiny_depth_estimator():
    """A tiny DPTForDepthEstimation (plain ViT backbone, 4 layers) and its DPTImageProcessor."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=SIZE,
        patch_size=8, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=(8, 16, 32, 32), fusion_hidden_size=16,
        reassemble_factors=(4, 2, 1, 0.5), is_hybrid=False, use_auxiliary_head=False, head_in_index=-1,
    )
    model = DPTForDepthEstimation(config).eval()
    # With initializer_range 0.02 the random head predicts depths of ~1e-9, which underflow to a constant 0
    # in fp16 (and a constant depth map normalises to NaN). PyTorch's default init and a positive bias give
    # an O(1) depth that varies in every dtype, as a trained DPT's does.
    with torch.no_grad():
        for layer in model.head.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.reset_parameters()
        model.head.head[-2].bias.fill_(1.0)
    processor = DPTImageProcessor(size={"height": SIZE, "width": SIZE}, keep_aspect_ratio=False, do_rescale=True,
                                  do_normalize=True)
    return model, processor


def _bert_tokenizer(work: str):
    """A BertTokenizer over a tiny word-piece vocabulary (special tokens, letters, digits, a few words)."""
    from transformers import BertTokenizer

    from .presets import EMBEDDED_WORDS

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789-<>"
    tokens += list(chars) + ["##" + c for c in chars]
    tokens += [w for w in EMBEDDED_WORDS + ("cat", "dog", "castle", "painting") if w not in tokens]
    path = os.path.join(work, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return BertTokenizer.from_pretrained(work, model_max_length=77)


def _ldm(work: str):
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from .presets import SD_SCHEDULER

    tokenizer = _bert_tokenizer(work)
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer), max_position_embeddings=77, encoder_layers=2,
                                      encoder_ffn_dim=37, encoder_attention_heads=2, head_dim=16, d_model=32)).eval()
    # LDM samples latents at height // 8, so the VQ-VAE needs four levels.
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                    latent_channels=4, norm_num_groups=8, num_vq_embeddings=64, sample_size=SIZE)
    unet = UNet2DConditionModel(sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4))
    return LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet,
                                  scheduler=DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False))


def _ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def _refiner(seed: int, work: str):
    """Like stabilityai/stable-diffusion-xl-refiner-1.0: only text encoder 2 (so cross attention sees its 32
    features), and 5 time ids (original size, crop, aesthetic score) instead of 6."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .presets import SDXL_TIME_IDS, get_preset

    p = get_preset("sdxl-tiny")
    time_dim = p.unet["addition_time_embed_dim"]
    unet_changes = dict(cross_attention_dim=p.text_2["hidden_size"],
                        projection_class_embeddings_input_dim=(SDXL_TIME_IDS - 1) * time_dim
                        + p.text_2["projection_dim"])
    comps = _sd_components("sdxl-tiny", seed, work, **unet_changes)
    return StableDiffusionXLImg2ImgPipeline(
        vae=comps["vae"], text_encoder=None, text_encoder_2=comps["text_encoder_2"], tokenizer=None,
        tokenizer_2=comps["tokenizer_2"], unet=comps["unet"], scheduler=comps["scheduler"],
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)


def _controlnet(preset: str, seed: int, work: str):
    """ControlNetModel.from_unet of the preset's UNet, with its zero-initialised output layers randomised so
    that the conditioning image visibly changes the result (a freshly made ControlNet adds exactly zero)."""
    import torch
    from diffusers import ControlNetModel

    comps = _sd_components(preset, seed, work)
    vae_levels = len(comps["preset"].vae["block_out_channels"])
    # The conditioning embedding must shrink the image by the VAE's factor: one stride-2 stage per level.
    channels = (16, 32, 96, 256)[:vae_levels]
    net = ControlNetModel.from_unet(comps["unet"], conditioning_embedding_out_channels=channels)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.normal_(0.0, 0.05)
    return net


TEST_WORDS = ("a", "photo", "of", "sks", "dog", "in", "bucket", "cat", "painting", "handwritten", "digit", "the")


def _dit_text_parts(work: str, t5: bool = True, clip_projection: bool = True) -> dict:
    """The text encoders and tokenizers of diffusers' SD3 / FLUX pipeline tests: CLIP 32 wide, 5 layers, 4 heads
    (with or without projection), a T5 encoder of the ``tiny-random-t5`` shape (d_model 32, 5 layers, 4
    heads); each seeded with 0 as the tests do."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .presets import EMBEDDED_WORDS, build_tokenizer
    from .t5_tokenizer import build_t5_tokenizer

    words = tuple(dict.fromkeys(EMBEDDED_WORDS + TEST_WORDS))
    clip_tok = build_tokenizer(os.path.join(work, "clip_tokenizer"), words, max_length=77)
    n = len(clip_tok)
    clip = CLIPTextConfig(bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1, hidden_size=32,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                          vocab_size=max(1000, n), hidden_act="gelu", projection_dim=32)
    cls = CLIPTextModelWithProjection if clip_projection else CLIPTextModel
    torch.manual_seed(0)
    te1 = cls(clip)
    torch.manual_seed(0)
    te2 = cls(clip)
    out = {"clip_tokenizer": clip_tok, "clip_1": te1, "clip_2": te2}
    if t5:
        t5_tok = build_t5_tokenizer(words)
        torch.manual_seed(0)
        out["t5"] = T5EncoderModel(T5Config(vocab_size=max(1000, len(t5_tok)), d_model=32, d_ff=37, d_kv=8,
                                            num_layers=5, num_heads=4, relative_attention_num_buckets=8,
                                            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
        out["t5_tokenizer"] = t5_tok
    return out


def _dit_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    import torch

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def sd3_transformer(**changes):
    """SD3Transformer2DModel at diffusers' pipeline-test size (seed 0)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**dict(dict(sample_size=SIZE, patch_size=1, in_channels=4, num_layers=1,
                                             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                             joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
                                        **changes))


def _sd3(work: str, t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    text = _dit_text_parts(work, t5=t5)
    transformer = sd3_transformer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_dit_vae(4),
        text_encoder=text["clip_1"], tokenizer=text["clip_tokenizer"], text_encoder_2=text["clip_2"],
        tokenizer_2=text["clip_tokenizer"], text_encoder_3=text.get("t5"), tokenizer_3=text.get("t5_tokenizer"))


def _sd3_controlnet():
    """SD3ControlNetModel sized for ``sd3`` (one layer), its zero-initialised layers randomised (non-zero
    residuals, as a trained ControlNet has)."""
    import torch
    from diffusers import SD3ControlNetModel

    torch.manual_seed(0)
    net = SD3ControlNetModel(sample_size=SIZE, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                             pooled_projection_dim=64, out_channels=4)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                param.normal_(0.0, 0.05)
    return net


def flux_transformer(**changes):
    """FluxTransformer2DModel at diffusers' pipeline-test size (seed 0)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**dict(dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]), **changes))


def _flux(work: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    text = _dit_text_parts(work, clip_projection=False)
    return FluxPipeline(transformer=flux_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_dit_vae(1), text_encoder=text["clip_1"], tokenizer=text["clip_tokenizer"],
                        text_encoder_2=text["t5"], tokenizer_2=text["t5_tokenizer"])


def _flux_controlnet():
    """FluxControlNetModel.from_transformer of ``flux``'s transformer (one double and one single block), its
    zero-initialised layers randomised (std 0.2) so the conditioning image visibly changes the result."""
    import torch
    from diffusers import FluxControlNetModel

    transformer = flux_transformer()
    cfg = transformer.config
    net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=cfg.attention_head_dim,
                                               num_attention_heads=cfg.num_attention_heads)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                param.normal_(0.0, 0.2)
    return net


def build(kind: str, folder: str, seed: int = 0) -> str:
    """Write the tiny ``kind`` (see the module docstring) into ``folder``; returns ``folder``."""
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"unknown test pipeline kind {kind!r}; expected one of {', '.join(KINDS)}")
    _seed(seed)
    with tempfile.TemporaryDirectory(prefix="dnpu-tiny-") as work:
        if kind in ("sd", "sd-safety", "sd-nsfw"):
            comps = _sd_components("tiny", seed, work)
            checker = processor = None
            if kind != "sd":
                checker, processor = tiny_safety_checker(flag_everything=kind == "sd-nsfw")
            obj = diffusers.StableDiffusionPipeline(**_sd_kwargs(comps), safety_checker=checker,
                                                    feature_extractor=processor,
                                                    requires_safety_checker=checker is not None)
        elif kind == "sd-inpaint":
            obj = diffusers.StableDiffusionInpaintPipeline(
                **_sd_kwargs(_sd_components("tiny", seed, work, unet_in_channels=9)), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        elif kind in ("sd-depth", "sd-depth-noest"):
            estimator, processor = tiny_depth_estimator() if kind == "sd-depth" else (None, None)
            obj = diffusers.StableDiffusionDepth2ImgPipeline(
                **_sd_kwargs(_sd_components("tiny", seed, work, unet_in_channels=5)), depth_estimator=estimator,
                feature_extractor=processor)
        elif kind == "ldm":
            obj = _ldm(work)
        elif kind == "ddpm":
            obj = _ddpm()
        elif kind == "sdxl":
            obj = diffusers.StableDiffusionXLPipeline(**_sdxl_kwargs(_sd_components("sdxl-tiny", seed, work)))
        elif kind == "sdxl-inpaint":
            obj = diffusers.StableDiffusionXLInpaintPipeline(
                **_sdxl_kwargs(_sd_components("sdxl-tiny", seed, work, unet_in_channels=9)))
        elif kind == "sdxl-refiner":
            obj = _refiner(seed, work)
        elif kind in ("sd3", "sd3-no-t5"):
            obj = _sd3(work, t5=kind == "sd3")
        elif kind == "sd3-controlnet":
            obj = _sd3_controlnet()
        elif kind == "flux":
            obj = _flux(work)
        elif kind == "flux-controlnet":
            obj = _flux_controlnet()
        elif kind in ("controlnet", "sdxl-controlnet"):
            obj = _controlnet("tiny" if kind == "controlnet" else "sdxl-tiny", seed, work)
        else:  # dpt
            model, processor = tiny_depth_estimator()
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            return folder
        obj.save_pretrained(folder, safe_serialization=True)
    return folder


KINDS = ("sd", "sd-safety", "sd-nsfw", "sd-inpaint", "sd-depth", "sd-depth-noest", "ldm", "ddpm", "sdxl",
         "sdxl-inpaint", "sdxl-refiner", "controlnet", "sdxl-controlnet", "dpt", "sd3", "sd3-no-t5", "sd3-controlnet",
         "flux", "flux-controlnet")

__all__ = ["KINDS", "SIZE", "build", "flux_transformer", "sd3_transformer", "tiny_depth_estimator",
           "tiny_safety_checker"]
