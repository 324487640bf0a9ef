"""The embedded SD3 default: a small Stable Diffusion 3 built offline, trained with flow matching on the embedded
digits.

The model has SD3's architecture at the size of the SD digits model: an ``SD3Transformer2DModel`` (joint
attention over image and text tokens, pooled-text conditioning), two ``CLIPTextModelWithProjection`` encoders
sharing the whole-word CLIP tokenizer, a ``T5EncoderModel`` with an offline Unigram T5 tokenizer
(:mod:`.t5_tokenizer`), the fitted f=2 digits VAE of the SD model (``assets/digits_vae.safetensors``, with
``shift_factor`` 0) and a ``FlowMatchEulerDiscreteScheduler``. Transformer and text encoders come from seed 0;
the CLIP word embeddings are scaled as in the SDXL default (:data:`TOKEN_EMBEDDING_SCALE`: SD3 reads the CLIPs'
penultimate hidden states too). The data set is the embedded digits data set of :mod:`.embedded`.

Made once into ``$DIFFUSERS_NPU_HOME`` (atomic: a temp folder renamed into place).
"""
from __future__ import annotations

import json
import logging
import os

from . import embedded

logger = logging.getLogger(__name__)

SD3_EMBEDDED_VERSION = 1  # bump when the recipe changes so stale caches are rebuilt
RESOLUTION = embedded.RESOLUTION
TEXT_MAX_LENGTH = 8  # CLIP positions (the embedded config trains T5 at --max_sequence_length 32, the pipeline: 256)
TOKEN_EMBEDDING_SCALE = 16.0

TRANSFORMER = dict(sample_size=RESOLUTION // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
                   pooled_projection_dim=64, pos_embed_max_size=RESOLUTION // 2)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
            max_position_embeddings=TEXT_MAX_LENGTH)
T5 = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)


def paths() -> dict:
    root = os.path.join(embedded.home(), f"embedded-v{embedded.EMBEDDED_VERSION}")
    return {"model": os.path.join(root, f"digits-sd3-v{SD3_EMBEDDED_VERSION}"),
            "dataset": os.path.join(root, "digits-dataset")}


def prepare(force: bool = False, progress: bool = True) -> dict:
    """Make (once) and return ``{'model': folder, 'dataset': folder}`` of the embedded SD3 default."""
    return embedded.prepare_with(paths()["model"], lambda folder: write_model(folder, progress), force)


def build_pipeline(progress: bool = False, tokenizer_dir: str = None):
    """The embedded SD3 pipeline in memory (seeded)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .presets import EMBEDDED_WORDS, build_tokenizer, get_preset
    from .t5_tokenizer import build_t5_tokenizer

    clip_tok = build_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="dnpu-tok-"), EMBEDDED_WORDS, TEXT_MAX_LENGTH)
    t5_tok = build_t5_tokenizer(EMBEDDED_WORDS)
    n = len(clip_tok)
    clip = CLIPTextConfig(vocab_size=n, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1, **CLIP)
    torch.manual_seed(0)
    te1, te2 = CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **T5))
    transformer = SD3Transformer2DModel(**TRANSFORMER)
    vae = AutoencoderKL(**get_preset("digits").vae, shift_factor=0.0)
    vae_from, _ = embedded.vae_weights(vae, progress)
    with torch.no_grad():
        for te in (te1, te2):
            te.get_input_embeddings().weight.mul_(TOKEN_EMBEDDING_SCALE)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                    vae=vae, text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2,
                                    tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok)
    return pipe, vae_from


def write_model(folder: str, progress: bool = True) -> str:
    def fill(tmp):
        pipe, vae_from = build_pipeline(progress, tokenizer_dir=os.path.join(tmp, "_tok"))
        pipe.save_pretrained(tmp, safe_serialization=True)
        return {"recipe": "diffusers_npu.embedded_sd3.prepare", "version": SD3_EMBEDDED_VERSION, "vae": vae_from}

    return embedded.write_model_folder(folder, fill)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build the embedded SD3 digits model (and the digits data set) into "
                                            "$DIFFUSERS_NPU_HOME")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(prepare(force=p.parse_args().force), indent=1))
