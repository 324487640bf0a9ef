"""FLOPs per image of a training step, counted on the meta device (no memory, no compute).

``torch.utils.flop_counter.FlopCounterMode`` counts the matmul, convolution and attention FLOPs autograd
actually runs, so the three kinds of step are counted by running them, not by a formula:

* ``full``       -- UNet forward + backward with every UNet weight trained;
* ``lora``       -- the same with the UNet frozen and LoRA adapters (``--rank``) on its attention
                    projections: the backward computes input gradients through frozen layers but no weight
                    gradients for them (about 2x instead of 3x the forward);
* ``controlnet`` -- a ControlNet (``ControlNetModel.from_unet``) forward + backward and the frozen UNet's
                    forward + the backward through it into the ControlNet's residuals.

The encoders (VAE encoder and text encoder(s), forward only) are counted apart: they are in the step only
when latents are not cached. Gradient checkpointing's recomputation is not counted (model FLOPs, as MFU
figures usually are); SDPA is counted without the recomputation a flash backward adds.
"""
from __future__ import annotations

import torch

KINDS = ("full", "lora", "controlnet")


def count_flops(fn) -> int:
    """Matmul/conv/attention FLOPs of ``fn()`` as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _meta_models(preset, seq_len: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..attention import set_attention

    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        encoders = [CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=seq_len, **preset.text))]
        if preset.text_2 is not None:
            encoders.append(CLIPTextModelWithProjection(
                CLIPTextConfig(vocab_size=49408, max_position_embeddings=seq_len, **preset.text_2)))
    set_attention(unet, "default")
    return unet, vae, encoders


def _unet_inputs(preset, unet, resolution: int, seq_len: int, vae_factor: int) -> tuple:
    lat = resolution // vae_factor
    x = torch.randn(1, unet.config.in_channels, lat, lat, device="meta")
    t = torch.tensor([500], device="meta")
    states = torch.randn(1, seq_len, unet.config.cross_attention_dim, device="meta")
    extra = {}
    if preset.text_2 is not None:  # SDXL: pooled projection of text encoder 2 + six micro-conditioning ids
        pooled = preset.text_2.get("projection_dim", preset.text_2["hidden_size"])
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, device="meta"),
                                      "time_ids": torch.randn(1, 6, device="meta")}
    return x, t, states, extra


def count_training_flops(preset, resolution: int, seq_len: int, kinds=KINDS, lora_rank: int = 4) -> dict:
    """Per-image FLOPs at batch 1: ``{kind}_fwd_bwd`` for each step kind asked for, ``vae_encoder_fwd``,
    ``text_encoder_fwd`` (all text encoders together). ``unet_fwd_bwd`` is ``full_fwd_bwd`` (older name)."""
    unet, vae, encoders = _meta_models(preset, seq_len)
    vae_factor = 2 ** (len(preset.vae["block_out_channels"]) - 1)
    x, t, states, extra = _unet_inputs(preset, unet, resolution, seq_len, vae_factor)

    def unet_step():
        out = unet(x, t, states, return_dict=False, **extra)[0]
        out.float().pow(2).mean().backward()

    out = {}
    if "full" in kinds:
        out["full_fwd_bwd"] = out["unet_fwd_bwd"] = count_flops(unet_step)
    if "controlnet" in kinds:
        from diffusers import ControlNetModel

        from ..train.tasks.controlnet import embedding_channels_for

        with torch.device("meta"):  # the conditioning embedding downsamples by the VAE's factor, as the task's
            channels = embedding_channels_for(vae_factor)
            controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                                   conditioning_embedding_out_channels=channels)
        unet.requires_grad_(False)
        cond = torch.randn(1, 3, resolution, resolution, device="meta")

        def controlnet_step():
            down, mid = controlnet(x, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False,
                                   **extra)
            pred = unet(x, t, states, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        return_dict=False, **extra)[0]
            pred.float().pow(2).mean().backward()

        out["controlnet_fwd_bwd"] = count_flops(controlnet_step)
        unet.requires_grad_(True)
    if "lora" in kinds:  # last: it changes the UNet
        from ..train.tasks.lora import UNET_TARGETS, add_lora

        add_lora(unet, lora_rank, None, UNET_TARGETS)
        out["lora_fwd_bwd"] = count_flops(unet_step)

    def vae_enc():
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, resolution, resolution, device="meta"))

    def text():
        with torch.no_grad():
            for te in encoders:
                te(torch.zeros(1, seq_len, dtype=torch.long, device="meta"))

    out["vae_encoder_fwd"] = count_flops(vae_enc)
    out["text_encoder_fwd"] = count_flops(text)
    return out


def step_flops(counts: dict, kind: str, encoders_in_step: bool) -> int:
    """FLOPs per image one step of ``kind`` executes (encoders only when they run in the step)."""
    f = counts[f"{kind}_fwd_bwd"]
    if encoders_in_step:
        f += counts["vae_encoder_fwd"] + counts["text_encoder_fwd"]
    return f


# ------------------------------------------------------------------------------ diffusion transformers
#: the attention projections upstream's SD3 / FLUX LoRA scripts adapt by default (image and text streams)
DIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
DIT_KINDS = ("full", "lora")


def _dit_inputs(family: str, vae_factor: int, transformer, resolution: int, text_len: int) -> dict:
    """Batch-1 meta inputs of an SD3 / FLUX transformer at ``resolution`` px with ``text_len`` T5 tokens (SD3's
    prompt states also carry 77 CLIP tokens before them; FLUX's are the T5 tokens alone)."""
    cfg = transformer.config
    lat = resolution // vae_factor
    meta = dict(device="meta")
    if family == "flux":
        tokens = (lat // 2) ** 2  # 2x2 latent patches packed into one token
        inputs = dict(hidden_states=torch.randn(1, tokens, cfg.in_channels, **meta),
                      encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, **meta),
                      pooled_projections=torch.randn(1, cfg.pooled_projection_dim, **meta),
                      timestep=torch.ones(1, **meta), img_ids=torch.zeros(tokens, 3, **meta),
                      txt_ids=torch.zeros(text_len, 3, **meta))
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.ones(1, **meta)
        return inputs
    return dict(hidden_states=torch.randn(1, cfg.in_channels, lat, lat, **meta),
                encoder_hidden_states=torch.randn(1, 77 + text_len, cfg.joint_attention_dim, **meta),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, **meta),
                timestep=torch.ones(1, **meta))


def _dit_encoders(p):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        encoders = []
        for kind, cfg in p.text_encoders:
            if kind == "t5":
                encoders.append((T5EncoderModel(T5Config(**cfg)), p.max_sequence_length))
            else:
                cls = CLIPTextModelWithProjection if kind == "clip_projection" else CLIPTextModel
                encoders.append((cls(CLIPTextConfig(vocab_size=49408, **cfg)), 77))
    return encoders


def count_dit_step_flops(family: str, transformer_config: dict, vae_config: dict, resolution: int, text_len: int,
                         kinds=DIT_KINDS, lora_rank: int = 4, lora_targets=DIT_LORA_TARGETS) -> dict:
    """Per-image FLOPs at batch 1 of an SD3 / FLUX step from the transformer's and the VAE's configs (a model
    folder's ``config.json`` files, or a preset's): ``full_fwd_bwd`` (every transformer weight trained),
    ``lora_fwd_bwd`` (adapters on ``lora_targets``), ``vae_encoder_fwd``; ``text_len`` T5 tokens."""
    import diffusers

    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    with torch.device("meta"):
        transformer = cls(**{k: v for k, v in transformer_config.items() if not k.startswith("_")})
        vae = diffusers.AutoencoderKL(**{k: v for k, v in vae_config.items() if not k.startswith("_")})
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    inputs = _dit_inputs(family, vae_factor, transformer, resolution, text_len)

    def step():
        out = transformer(**inputs, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    out = {}
    if "full" in kinds:
        out["full_fwd_bwd"] = count_flops(step)
    if "lora" in kinds:  # last: it changes the transformer
        from ..train.tasks.lora import add_lora

        add_lora(transformer, lora_rank, None, lora_targets)
        out["lora_fwd_bwd"] = count_flops(step)

    def vae_enc():
        with torch.no_grad():
            vae.encode(torch.randn(1, 3, resolution, resolution, device="meta"))

    out["vae_encoder_fwd"] = count_flops(vae_enc)
    return out


def count_dit_flops(name: str, resolution: int, kinds=DIT_KINDS, lora_rank: int = 4,
                    text_len: int | None = None) -> dict:
    """Per-image FLOPs of an SD3 / FLUX preset (:mod:`diffusers_npu.dit_presets`) at batch 1, counted on the
    meta device: ``full_fwd_bwd`` (every transformer weight trained), ``lora_fwd_bwd`` (adapters on
    ``DIT_LORA_TARGETS``), ``vae_encoder_fwd`` and ``text_encoder_fwd`` (CLIP(s) + T5, once per caption when
    cached). ``text_len``: T5 tokens the transformer sees (default: the pipeline's ``max_sequence_length``)."""
    from ..dit_presets import get_dit_preset

    p = get_dit_preset(name)
    out = count_dit_step_flops(p.family, p.transformer, p.vae, resolution, text_len or p.max_sequence_length,
                               kinds, lora_rank)

    def text():
        with torch.no_grad():
            for model, length in _dit_encoders(p):
                model(torch.zeros(1, length, dtype=torch.long, device="meta"))

    out["text_encoder_fwd"] = count_flops(text)
    return out
