"""Diffusion-transformer architectures as configs (random weights, never downloaded): Stable Diffusion 3
medium, Stable Diffusion 3.5 large and FLUX.1-dev, for the benchmark, the FLOP counts and the memory plan
(issue #21 item 9). The numbers are those of the published ``config.json`` files of
stabilityai/stable-diffusion-3-medium-diffusers, stabilityai/stable-diffusion-3.5-large and
black-forest-labs/FLUX.1-dev (transformer, VAE, text encoders).

:func:`build_transformer` makes the denoiser (``device="meta"``: shapes only, no memory), as the FLOP counter
(:mod:`diffusers_npu.benchmark.flops`) and the memory-plan test use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

DIT_PRESETS = ("sd3-medium", "sd35-large", "flux1-dev")

# CLIP ViT-L/14 (SD3's text_encoder and FLUX's), OpenCLIP ViT-bigG/14 (SD3's text_encoder_2), T5 v1.1 XXL
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_gated_act=True)
_VAE16 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


@dataclass(frozen=True)
class DiTPreset:
    name: str
    family: str  # sd3 / flux (model_folder.model_family)
    resolution: int  # the native resolution
    transformer: dict
    vae: dict
    text_encoders: tuple  # (kind, config): kind clip / clip_projection / t5
    max_sequence_length: int  # T5 tokens the pipeline encodes by default
    scheduler: dict = field(default_factory=dict)  # FlowMatchEulerDiscreteScheduler config

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def transformer_class(self):
        import diffusers

        return diffusers.FluxTransformer2DModel if self.family == "flux" else diffusers.SD3Transformer2DModel


def get_dit_preset(name: str) -> DiTPreset:
    if name in ("sd3-medium", "sd35-large"):
        medium = DiTPreset(
            "sd3-medium", "sd3", 1024,
            transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
            vae=dict(_VAE16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoders=(("clip_projection", CLIP_L), ("clip_projection", CLIP_BIGG), ("t5", T5_XXL)),
            max_sequence_length=256, scheduler=dict(shift=3.0))
        if name == "sd3-medium":
            return medium
        # SD3.5 large: the same VAE, text encoders and scheduler; a deeper, wider transformer with q/k RMSNorm
        return replace(medium, name="sd35-large", transformer=dict(
            medium.transformer, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm"))
    if name == "flux1-dev":
        return DiTPreset(
            "flux1-dev", "flux", 1024,
            transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
            vae=dict(_VAE16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoders=(("clip", CLIP_L), ("t5", T5_XXL)),
            max_sequence_length=512,
            scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                           base_image_seq_len=256, max_image_seq_len=4096))
    raise ValueError(f"unknown transformer preset {name!r}; expected one of {', '.join(DIT_PRESETS)}")


def build_transformer(name: str, device: Optional[str] = "meta", **changes):
    """The preset's transformer with random weights (on ``device``; "meta" allocates nothing)."""
    import torch

    p = get_dit_preset(name)
    with torch.device(device or "cpu"):
        return p.transformer_class()(**dict(p.transformer, **changes))


def latent_tokens(name: str, resolution: int) -> int:
    """Image tokens the transformer sees at ``resolution`` px: SD3 patchifies 2x2 latents in the transformer,
    FLUX packs 2x2 latents into one token before it."""
    p = get_dit_preset(name)
    side = resolution // p.vae_factor
    return (side // 2) ** 2


__all__ = ["CLIP_BIGG", "CLIP_L", "DIT_PRESETS", "DiTPreset", "T5_XXL", "build_transformer", "get_dit_preset",
           "latent_tokens"]
