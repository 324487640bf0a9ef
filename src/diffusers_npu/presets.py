"""Model architectures built from configs (random weights, no downloads).

Presets:
  tiny      -- a few-MB Stable Diffusion for tests and CPU smoke runs
  digits    -- the embedded default model (see :mod:`diffusers_npu.embedded`): 16 px images,
               an f=2 VAE, a wide-ish UNet and a whole-word CLIP tokenizer
  sd15      -- the SD 1.5 architecture (UNet 860M, CLIP ViT-L text encoder)
  sd21-base -- the SD 2.1-base architecture (512 px, OpenCLIP-H text encoder, linear projections)
  sd21      -- the SD 2.1 architecture (768 px, v-prediction)
  sdxl-tiny -- a few-MB Stable Diffusion XL for tests: two small CLIP text encoders (CLIPTextModel +
               CLIPTextModelWithProjection) sharing the whole-word tokenizer, a tiny UNet with SDXL's
               ``text_time`` micro-conditioning, tiny's f=2 VAE
  sdxl      -- the SDXL 1.0 base architecture (UNet 2.6B, CLIP ViT-L + OpenCLIP bigG text encoders, 1024 px)
  sdxl-digits -- the embedded SDXL default (see :mod:`diffusers_npu.embedded_sdxl`): the SDXL architecture at
               the digits model's size (16 px, the digits model's fitted f=2 VAE, two small text encoders with
               the whole-word tokenizer)

Every preset returns the same dict of components (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``noise_scheduler``; SDXL presets also ``text_encoder_2`` and ``tokenizer_2``) so tests, benchmarks and the
embedded default share one builder. The tiny test pipelines of every kind (inpainting, depth, LDM, DDPM,
SDXL, ControlNet, ...) are made by :func:`build_test_pipeline` from these configs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

PRESETS = ("tiny", "digits", "sd15", "sd21-base", "sd21", "sdxl-tiny", "sdxl", "sdxl-digits")

# The scheduler settings Stable Diffusion was trained with. DDPMScheduler's defaults (linear betas,
# clip_sample=True) silently ruin latent-space sampling, so every preset uses these instead.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
)

# Words of the embedded digits captions; each becomes one whole-word token so that the prompt's digit is
# a single, distinct embedding (byte-level tokens were too weak a signal to learn on a CPU budget).
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EMBEDDED_WORDS = ("a", "handwritten", "digit", "photo", "of", "sks", "in", "the", "style", "picture") + DIGIT_WORDS


@dataclass
class Preset:
    name: str
    resolution: int
    unet: dict
    vae: dict
    text: dict
    tokenizer_max_length: int = 77
    prediction_type: str = "epsilon"
    # Extra noise-scheduler config (training and the saved pipeline's sampler), e.g. a zero terminal SNR.
    scheduler: dict = field(default_factory=dict)
    vae_scaling_factor: float = 0.18215
    extra_words: tuple = field(default_factory=tuple)
    # SDXL: the second text encoder (CLIPTextModelWithProjection); its pooled, projected output and the
    # micro-conditioning time ids feed the UNet's ``text_time`` embedding.
    text_2: Optional[dict] = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_2 is not None


def _sd_unet(block_out, cross_dim, head_dim, linear_proj=False, sample_size=64):
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=block_out,
        layers_per_block=2,
        cross_attention_dim=cross_dim,
        attention_head_dim=head_dim,
        use_linear_projection=linear_proj,
    )


_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

# SDXL's UNet gets 6 time ids (original size, crop top-left, target size), each embedded with
# ``addition_time_embed_dim`` sinusoids, concatenated with the pooled projection of text encoder 2.
SDXL_TIME_IDS = 6


def _sdxl_unet(block_out, cross_dim, head_dim, layers, time_dim, pooled_dim, sample_size, **extra):
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_out) - 1)
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=block_out,
        layers_per_block=layers,
        cross_attention_dim=cross_dim,
        attention_head_dim=head_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * time_dim + pooled_dim,
        **extra,
    )


def get_preset(name: str) -> Preset:
    if name == "tiny":
        return Preset(
            name="tiny",
            resolution=32,
            unet=dict(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=16,
            ),
            vae=dict(_TINY_VAE),
            text=dict(_TINY_TEXT),
            tokenizer_max_length=16,
            extra_words=EMBEDDED_WORDS,
        )
    if name == "digits":
        return Preset(
            name="digits",
            resolution=16,
            unet=dict(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(64, 128),
                layers_per_block=1,
                cross_attention_dim=64,
                attention_head_dim=8,
                norm_num_groups=32,
            ),
            vae=dict(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=16,
                sample_size=16,
            ),
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            tokenizer_max_length=16,
            extra_words=EMBEDDED_WORDS,
            # At 16 px (an 8x8x4 latent) SD's schedule ends at an SNR that leaves the digit readable in the
            # starting noise (alpha_bar 0.0047 over 256 dimensions): the model learns to read the class from
            # the noise, and without classifier-free guidance it drew that class, not the prompt's (84% at
            # guidance 1). A zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules and sample
            # steps are flawed") with v-prediction and "trailing" sampling steps fixes it: 95-100% at guidance
            # 1 in half the steps (bench/RESULTS.md).
            prediction_type="v_prediction",
            scheduler=dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
        )
    if name == "sd15":
        return Preset(
            name="sd15",
            resolution=512,
            unet=_sd_unet((320, 640, 1280, 1280), 768, 8),
            vae=dict(_SD_VAE),
            text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="quick_gelu", projection_dim=768),
        )
    if name in ("sd21-base", "sd21"):
        return Preset(
            name=name,
            resolution=512 if name == "sd21-base" else 768,
            unet=_sd_unet((320, 640, 1280, 1280), 1024, (5, 10, 20, 20), linear_proj=True,
                          sample_size=64 if name == "sd21-base" else 96),
            vae=dict(_SD_VAE, sample_size=768 if name == "sd21" else 512),
            text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      hidden_act="gelu", projection_dim=512),
            prediction_type="epsilon" if name == "sd21-base" else "v_prediction",
        )
    if name == "sdxl-tiny":
        text_2 = dict(_TINY_TEXT, projection_dim=32)
        return Preset(
            name="sdxl-tiny",
            resolution=32,
            # cross attention sees both encoders' hidden states side by side: 32 + 32
            unet=_sdxl_unet((32, 64), 64, (2, 4), 1, 8, text_2["projection_dim"], 16, norm_num_groups=16),
            vae=dict(_TINY_VAE, force_upcast=True),
            text=dict(_TINY_TEXT),
            text_2=text_2,
            tokenizer_max_length=16,
            vae_scaling_factor=0.13025,
            extra_words=EMBEDDED_WORDS,
        )
    if name == "sdxl":
        # stabilityai/stable-diffusion-xl-base-1.0: cross attention 768 + 1280 = 2048, 10 transformer layers at
        # the lowest resolution, 256-dim time-id embeddings (6 x 256 + 1280 = 2816)
        return Preset(
            name="sdxl",
            resolution=1024,
            unet=_sdxl_unet((320, 640, 1280), 2048, (5, 10, 20), 2, 256, 1280, 128,
                            transformer_layers_per_block=(1, 2, 10)),
            vae=dict(_SD_VAE, sample_size=1024, force_upcast=True),
            text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="quick_gelu", projection_dim=768),
            text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                        hidden_act="gelu", projection_dim=1280),
            vae_scaling_factor=0.13025,
        )
    if name == "sdxl-digits":
        # The embedded SDXL default: the digits model's VAE (so the shipped fitted VAE loads into it), two
        # 64-wide text encoders (cross attention sees 64 + 64), and a UNet whose pooled-text + time-id embedding
        # tells every ResNet block which digit is asked for. The UNet is half the digits model's width: it
        # runs about 3x the images/s of (64, 128) on a CPU and learns the digits (learning check 100%) in 1000
        # steps, where (64, 128) reached 18% in 400 steps, about the same CPU time (README, Stable Diffusion XL).
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        text_2 = dict(text, projection_dim=64)
        return Preset(
            name="sdxl-digits",
            resolution=16,
            unet=_sdxl_unet((32, 64), 128, 4, 1, 16, text_2["projection_dim"], 8, norm_num_groups=16),
            vae=dict(get_preset("digits").vae),
            text=text,
            text_2=text_2,
            tokenizer_max_length=16,
            extra_words=EMBEDDED_WORDS,
        )
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: a real CLIPTokenizer (so pipelines save/load it like any SD tokenizer), built from a vocabulary
# we generate: every byte as a character token, and each word of ``words`` as a single whole-word token.

def _byte_chars() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable-unicode table, recomputed here (it is a fixed mapping).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer_files(folder: str, words=EMBEDDED_WORDS, max_length: int = 16) -> None:
    """Write vocab.json / merges.txt / tokenizer_config.json for a whole-word CLIP tokenizer."""
    os.makedirs(folder, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
    for c in _byte_chars():
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        # Left-to-right chain merges: ((w0 w1) w2) ... (w[:-1] w[-1]</w>). Each chain only ever merges a
        # prefix of its own word, so chains of different words never interfere.
        if len(word) == 1:
            continue
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            right = ch + "</w>" if last else ch
            merged = prefix + right
            line = f"{prefix} {right}"
            if line not in merges:
                merges.append(line)
            vocab.setdefault(merged, len(vocab))
            prefix = prefix + ch
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)


def build_tokenizer(folder: str, words=EMBEDDED_WORDS, max_length: int = 16):
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, words, max_length)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def build_components(name: str = "tiny", seed: int = 0, tokenizer_dir: str | None = None,
                     with_tokenizer: bool = True) -> dict:
    """Instantiate a preset with random weights (seeded). Returns unet, vae, text_encoder, tokenizer,
    noise_scheduler, preset (SDXL presets also text_encoder_2 and tokenizer_2, the same whole-word tokenizer).
    Large presets skip the tokenizer unless a folder is given (vocab size comes from it)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = get_preset(name)
    torch.manual_seed(seed)
    tokenizer = None
    vocab_size = 49408
    if with_tokenizer and p.extra_words:
        tokenizer = build_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="dnpu-tok-"), p.extra_words,
                                    p.tokenizer_max_length)
        vocab_size = len(tokenizer)

    def text_config(spec):
        return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=p.tokenizer_max_length,
                              bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                              **spec)

    # Creation order = random-number order: tiny and digits must keep their exact weights (the embedded
    # default is built from them), so the second text encoder comes last.
    text_encoder = CLIPTextModel(text_config(p.text))
    unet = UNet2DConditionModel(**p.unet)
    vae = AutoencoderKL(**p.vae, scaling_factor=p.vae_scaling_factor)
    scheduler = DDPMScheduler(**SD_SCHEDULER, **p.scheduler, prediction_type=p.prediction_type)
    comps = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=scheduler,
                 preset=p)
    if p.is_sdxl:
        from transformers import CLIPTextModelWithProjection

        comps.update(text_encoder_2=CLIPTextModelWithProjection(text_config(p.text_2)), tokenizer_2=tokenizer)
    return comps


def inference_scheduler_for(components: dict, name: Optional[str] = None):
    """The sampling scheduler a saved pipeline gets: ``name`` (a diffusers class), else DDIM for SD and
    Euler ("leading" spacing, as SDXL 1.0 ships) for SDXL, configured from the training noise schedule."""
    import diffusers

    config = components["noise_scheduler"].config
    sdxl = "text_encoder_2" in components
    cls = getattr(diffusers, name or ("EulerDiscreteScheduler" if sdxl else "DDIMScheduler"))
    extra = {"timestep_spacing": "leading"} if sdxl else {"set_alpha_to_one": False}
    return cls.from_config(config, **extra)


def save_pipeline_folder(components: dict, folder: str, inference_scheduler: Optional[str] = None) -> str:
    """Save components as a StableDiffusionPipeline folder (no safety checker), or a StableDiffusionXLPipeline
    folder for SDXL components, and return the folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = inference_scheduler_for(components, inference_scheduler)
    if "text_encoder_2" in components:
        pipe = StableDiffusionXLPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"],
            text_encoder_2=components["text_encoder_2"], tokenizer=components["tokenizer"],
            tokenizer_2=components["tokenizer_2"], unet=components["unet"], scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            unet=components["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_preset_folder(name: str, folder: str, seed: int = 0, dtype=None, scheduler: Optional[str] = None,
                        work_dir: Optional[str] = None) -> str:
    """Write preset ``name`` with random weights (``seed``) as a pipeline folder that ``--model`` accepts. Large
    presets get a whole-word CLIP tokenizer over a small vocabulary (their text encoders keep the real 49408
    embeddings). ``dtype`` (a torch dtype) casts the weights before saving: half the disk in fp16.
    ``python -m diffusers_npu.presets NAME FOLDER`` does the same from a shell (see :func:`main`)."""
    import shutil
    import tempfile

    p = get_preset(name)
    work = tempfile.mkdtemp(prefix="dnpu-preset-", dir=work_dir)
    try:
        comps = build_components(name, seed=seed, tokenizer_dir=os.path.join(work, "tokenizer"))
        if comps["tokenizer"] is None:
            comps["tokenizer"] = build_tokenizer(os.path.join(work, "tokenizer"), max_length=p.tokenizer_max_length)
            if p.is_sdxl:
                comps["tokenizer_2"] = comps["tokenizer"]
        if dtype is not None:
            for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
                if key in comps:
                    comps[key].to(dtype)
        return save_pipeline_folder(comps, folder, inference_scheduler=scheduler)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_test_pipeline(kind: str, folder: str, seed: int = 0) -> str:
    """Write a tiny random-weight pipeline (or component folder) of ``kind`` into ``folder`` for tests and
    smoke runs; see :data:`diffusers_npu.tiny_pipelines.KINDS`. Returns ``folder``."""
    from .tiny_pipelines import build

    return build(kind, folder, seed)


def main(argv=None) -> int:
    """``python -m diffusers_npu.presets NAME FOLDER [--seed S] [--scheduler CLASS]``: write a preset folder."""
    from .cliutil import ArgumentParser, run_main

    parser = ArgumentParser(prog="python -m diffusers_npu.presets",
                            description="Write a preset architecture with random weights as a pipeline folder.")
    parser.add_argument("name", choices=PRESETS, help="the preset")
    parser.add_argument("folder", help="where to write the pipeline folder")
    parser.add_argument("--seed", type=int, default=0, help="weights seed")
    parser.add_argument("--scheduler", default=None,
                        help="diffusers scheduler class of the folder (default: DDIM for SD, Euler for SDXL)")
    return run_main(lambda: print(write_preset_folder(**vars(parser.parse_args(argv)))))


if __name__ == "__main__":
    raise SystemExit(main())
