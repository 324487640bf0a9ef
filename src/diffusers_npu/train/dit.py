"""What every diffusion-transformer task shares (Stable Diffusion 3 / 3.5 and FLUX.1; the counterpart of
:mod:`.sd` and :mod:`.sdxl`).

A family (:data:`SD3`, :data:`FLUX`) names its pipeline class, its components and which text encoders are CLIP
and which is T5. On top of that this module gives every SD3 / FLUX task:

* loading the transformer, the VAE (fp32, outside autocast, as upstream's scripts run it), the text encoders
  (the autocast dtype) and the flow-matching scheduler from a local pipeline folder, refusing folders that
  lack a component (an SD3 folder without ``tokenizer_3`` / ``text_encoder_3``) with one line;
* prompts tokenized by every tokenizer of the family (T5 with ``--max_sequence_length``, checked against the
  T5 tokenizer's limit) and encoded exactly as the family's pipeline encodes them (:meth:`Family.encode`; a test
  checks it against ``pipeline.encode_prompt``), once per caption through the latent cache
  (:meth:`DiTTask.cache_encoders`), after which every encoder -- T5 included -- leaves the device;
* latents as the pipelines decode them: ``(z - shift_factor) * scaling_factor``;
* the flow-matching objective (:class:`~.objective.FlowMatchingObjective`) from upstream's flags;
* saving: the transformer (or a ControlNet) in diffusers layout, the full pipeline, or LoRA
  (``pytorch_lora_weights.safetensors`` for the family pipeline's ``load_lora_weights``).

FLUX's latent packing, image/text ids and guidance embedding live with the FLUX tasks.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import ModelError, UsageError
from ..model_folder import check_pipeline_folder, looks_local, read_model_index
from .objective import FlowMatchingObjective
from .sd import FLAG, DiffusionTask, Frozen, SDModule, base_scheduler, load_component
from .sdxl import decode_outside_autocast, no_autocast

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One diffusion-transformer family: its pipeline, components and text encoders."""

    name: str                      # sd3 | flux
    title: str                     # for messages
    pipeline_class: str
    classes: Dict[str, str]        # component -> class name (messages, loading)
    clip: Tuple[str, ...]          # CLIP text encoders, in the pipeline's order
    t5: str                        # the T5 text encoder
    lora_targets: Tuple[str, ...]  # upstream's default transformer LoRA targets
    #: latent pixels per token side, when not the transformer's patch size (FLUX packs 2x2 latents)
    token_side: Optional[int] = None

    @property
    def text_encoders(self) -> Tuple[str, ...]:
        return self.clip + (self.t5,)

    @staticmethod
    def tokenizer_of(encoder: str) -> str:
        return "tokenizer" + encoder[len("text_encoder"):]

    @staticmethod
    def ids_key(encoder: str, prefix: str = "") -> str:
        return f"{prefix}input_ids" + encoder[len("text_encoder"):]

    def encode(self, encoders: Dict[str, torch.nn.Module], ids: Dict[str, torch.Tensor],
               joint_dim: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) from token ids, as the family's pipeline computes them.

        SD3: both CLIP encoders' penultimate hidden states side by side, zero-padded (or cut) to T5's width,
        followed along the sequence by T5's last hidden states; pooled = both CLIPs' projected pooled outputs.
        FLUX: T5's last hidden states; pooled = CLIP's pooled output."""
        if self.name == "flux":
            clip = encoders[self.clip[0]]
            pooled = clip(ids[self.clip[0]].to(clip.device), output_hidden_states=False).pooler_output
            t5 = encoders[self.t5]
            return t5(ids[self.t5].to(t5.device), output_hidden_states=False)[0], pooled
        states, pooled = [], []
        for name in self.clip:
            enc = encoders[name]
            out = enc(ids[name].to(enc.device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip_states = torch.cat(states, dim=-1)
        t5 = encoders[self.t5]
        t5_states = t5(ids[self.t5].to(t5.device))[0]
        clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), torch.cat(pooled, dim=-1)


SD3 = Family(
    name="sd3", title="Stable Diffusion 3", pipeline_class="StableDiffusion3Pipeline",
    classes={"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
             "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
             "text_encoder_3": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
             "tokenizer_3": "T5TokenizerFast", "scheduler": "FlowMatchEulerDiscreteScheduler"},
    clip=("text_encoder", "text_encoder_2"), t5="text_encoder_3",
    lora_targets=("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                  "attn.to_out.0", "attn.to_q", "attn.to_v"))

FLUX = Family(
    name="flux", title="FLUX.1", pipeline_class="FluxPipeline",
    classes={"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
             "text_encoder_2": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast",
             "scheduler": "FlowMatchEulerDiscreteScheduler"},
    clip=("text_encoder",), t5="text_encoder_2",
    lora_targets=("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"), token_side=2)

FAMILIES = {f.name: f for f in (SD3, FLUX)}


# ----------------------------------------------------------------------------------------------- prompts
class DiTTokenize:
    """``tokenize`` for the data set: token ids of every tokenizer of the family (CLIP at its own length, T5
    at ``max_sequence_length``), under ``input_ids``, ``input_ids_2``, ... (picklable for loader workers)."""

    def __init__(self, family: Family, tokenizers: Dict[str, object], max_sequence_length: int):
        self.family, self.tokenizers, self.max_len = family, tokenizers, max_sequence_length

    def ids(self, captions) -> Dict[str, torch.Tensor]:
        """{encoder name: [B, L] ids} for a list of captions."""
        out = {}
        for enc in self.family.text_encoders:
            tok = self.tokenizers[enc]
            length = self.max_len if enc == self.family.t5 else tok.model_max_length
            out[enc] = tok(captions, padding="max_length", max_length=length, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
        return out

    def __call__(self, caption: str) -> dict:
        return {self.family.ids_key(enc): ids[0] for enc, ids in self.ids([caption]).items()}


class PromptTable:
    """``tokenize`` for the data set when the text encoders are frozen: each distinct caption's prompt states,
    encoded once up front (T5 then leaves the device), looked up per sample (picklable for loader workers)."""

    def __init__(self, table: Dict[str, Dict[str, torch.Tensor]]):
        self.table = table

    def __call__(self, caption: str) -> dict:
        return dict(self.table[caption])


def prompts_fn(family: Family, tokenize: DiTTokenize, encoders: Dict[str, torch.nn.Module]):
    """``encode_prompts`` for the latent cache: ``{"prompt_embeds", "pooled_prompt_embeds"}`` (float32 CPU)."""
    @torch.no_grad()
    def encode(captions: list) -> dict:
        embeds, pooled = family.encode(encoders, tokenize.ids(list(captions)))
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}
    return encode


# ------------------------------------------------------------------------------------------------ module
class DiTModule(SDModule):
    """Base of the SD3 / FLUX tasks' modules. Trained text encoders (LoRA) are registered under their pipeline
    names; the frozen ones are in ``frozen`` (or the cache already encoded)."""

    family: Family = SD3

    def latents(self, batch, gens=None, prefix: str = "") -> torch.Tensor:
        """Model-space latents ``(z - shift_factor) * scaling_factor``; the VAE runs in its own dtype (fp32),
        outside autocast."""
        vae = self.frozen.vae
        if f"{prefix}latent_moments" in batch:  # cached: sample from the stored posterior (mean, std)
            mean, std = batch[f"{prefix}latent_moments"].to(self.device, non_blocking=True).chunk(2, dim=1)
            z = mean + std * self.objective.randn(std, gens)
        else:
            with torch.no_grad(), no_autocast(self.device):
                px = batch[f"{prefix}pixel_values"].to(self.device, vae.dtype, non_blocking=True)
                dist = vae.encode(px).latent_dist
                z = dist.sample() if gens is None else dist.mean + dist.std * self.objective.randn(dist.std, gens)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z.float() - shift) * vae.config.scaling_factor

    def text_encoders(self) -> Dict[str, torch.nn.Module]:
        trained = self._modules
        return {n: trained[n] if n in trained else getattr(self.frozen, n) for n in self.family.text_encoders}

    @property
    def trains_text(self) -> bool:
        return any(n in self._modules for n in self.family.text_encoders)

    def prompt(self, batch, prefix: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds): cached / precomputed, or encoded now (with gradients into
        trained encoders)."""
        if f"{prefix}prompt_embeds" in batch and not self.trains_text:
            return (batch[f"{prefix}prompt_embeds"].to(self.device, non_blocking=True),
                    batch[f"{prefix}pooled_prompt_embeds"].to(self.device, non_blocking=True))
        ids = {n: batch[self.family.ids_key(n, prefix)] for n in self.family.text_encoders}
        with contextlib.nullcontext() if self.trains_text else torch.no_grad():
            return self.family.encode(self.text_encoders(), ids)

    def image_seq_len(self, latents: torch.Tensor, transformer) -> int:
        side = self.family.token_side or transformer.config.patch_size
        return (latents.shape[-2] // side) * (latents.shape[-1] // side)


# -------------------------------------------------------------------------------------------------- task
def add_dit_arguments(parser, max_sequence_length: int = 77) -> None:
    """Flags every SD3 / FLUX task has (upstream's names and defaults)."""
    from .objective import add_flow_matching_arguments

    parser.add_argument("--max_sequence_length", type=int, default=max_sequence_length,
                        help="T5 prompt length in tokens (longer prompts are cut); at most the T5 tokenizer's limit "
                             "(512 for the released models)")
    add_flow_matching_arguments(parser)


class DiTTask(DiffusionTask):
    """Shared SD3 / FLUX plumbing: components, tokenization, cache encoders, pipelines, outputs. Concrete tasks
    add their module's forward and what they save."""

    family: Family = SD3
    default_resolution = 1024

    @property
    def pipeline_class_name(self) -> str:  # noqa: D102
        return self.family.pipeline_class

    # ------------------------------------------------------------------------------------------ models
    def check_folder(self, path: str) -> None:
        """A local folder must be of this family and hold every component training needs."""
        fam = self.family
        index = read_model_index(path, FLAG)
        cls = index.get("_class_name", "")
        if "transformer" not in index or not index.get("transformer") or index["transformer"][0] is None:
            raise ModelError(f"{FLAG}: {path} is a {cls or 'pipeline'} folder without a transformer; this task "
                             f"trains {fam.title} models ({fam.pipeline_class})")
        missing_text = [n for n in (fam.t5, fam.tokenizer_of(fam.t5))
                        if not (isinstance(index.get(n), list) and index[n][0] is not None
                                and os.path.isdir(os.path.join(path, n)))]
        if missing_text:
            raise ModelError(f"{FLAG}: {path} has no {' / '.join(missing_text)} (the T5 text encoder); training "
                             f"{fam.title} here needs it -- use the model folder with T5 (e.g. the base "
                             f"repository, not a variant saved without {fam.t5})")
        need = ("transformer", "vae", "scheduler") + fam.text_encoders + tuple(
            fam.tokenizer_of(n) for n in fam.text_encoders)
        check_pipeline_folder(path, FLAG, need=need, class_names=fam.classes,
                              optional=("feature_extractor", "image_encoder"))

    def load_components(self, transformer_dtype: Optional[torch.dtype] = None) -> None:
        """tokenizers, noise_scheduler, text encoders (autocast dtype), the VAE (fp32), the transformer
        (``transformer_dtype``; fp32 master weights by default)."""
        import diffusers

        a, rt, fam = self.args, self.rt, self.family
        path = a.pretrained_model_name_or_path
        if looks_local(path):
            self.check_folder(path)
        self.tokenizers = {}
        for enc in fam.text_encoders:
            sub = fam.tokenizer_of(enc)
            cls = "AutoTokenizer" if enc == fam.t5 else "CLIPTokenizer"
            self.tokenizers[enc] = load_component(sub, path, a.revision, subfolder=sub, cls_name=cls)
        limit = self.tokenizers[fam.t5].model_max_length
        if a.max_sequence_length < 1 or a.max_sequence_length > limit:
            raise UsageError(f"--max_sequence_length {a.max_sequence_length}: the T5 tokenizer of {path} takes 1 to "
                             f"{limit} tokens")
        try:
            self.noise_scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
                path, subfolder="scheduler", revision=a.revision)
        except Exception as e:
            raise ModelError(f"{FLAG}: cannot load the scheduler (FlowMatchEulerDiscreteScheduler) of {path}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self.encoders = {}
        for enc in fam.text_encoders:
            model = load_component(enc, path, a.revision, a.variant, cls_name=fam.classes[enc],
                                   torch_dtype=rt.weight_dtype)
            model.requires_grad_(False).eval().to(rt.device)
            self.encoders[enc] = model
        # fp32 and outside autocast, as upstream's SD3 / FLUX scripts run the VAE
        self.vae = load_component("vae", path, a.revision, a.variant, cls_name=fam.classes["vae"])
        self.vae.requires_grad_(False).eval().to(rt.device)
        self.transformer = load_component("transformer", path, a.revision, a.variant,
                                          cls_name=fam.classes["transformer"], torch_dtype=transformer_dtype)
        self.transformer.to(rt.device)

    def frozen(self, **extra) -> Frozen:
        return Frozen(vae=self.vae, **self.encoders, **extra)

    #: whether --weighting_scheme also weights the loss (upstream's FLUX ControlNet script: only the density)
    weight_loss = True

    def objective(self) -> FlowMatchingObjective:
        a = self.args
        return FlowMatchingObjective(self.noise_scheduler, seed=a.seed, weighting_scheme=a.weighting_scheme,
                                     logit_mean=a.logit_mean, logit_std=a.logit_std, mode_scale=a.mode_scale,
                                     precondition_outputs=bool(a.precondition_outputs),
                                     per_sample_noise=a.per_sample_noise, weight_loss=self.weight_loss)

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def unet_downsampling(self) -> int:  # aspect-ratio buckets: sides divisible by the token size
        return self.family.token_side or self.transformer.config.patch_size

    # --------------------------------------------------------------------------------------------- data
    def tokenizer_fn(self) -> DiTTokenize:
        return DiTTokenize(self.family, self.tokenizers, self.args.max_sequence_length)

    def tokenize(self, caption: str) -> Dict[str, torch.Tensor]:
        return self.tokenizer_fn()(caption)

    def encode_captions(self, captions: List[str]) -> dict:
        """Prompt states of captions with the frozen encoders (float32 CPU), as the cache stores them."""
        return prompts_fn(self.family, self.tokenizer_fn(), self.encoders)(captions)

    def prompt_table(self, captions, batch_size: int = 64) -> PromptTable:
        """Encode each distinct caption once with the cache contract's ``encode_prompts``, then release the
        text encoders (and the VAE) from the device."""
        encode = self.cache_encoders()[1]
        distinct = sorted(set(captions))
        table = {}
        for i in range(0, len(distinct), batch_size):
            part = distinct[i:i + batch_size]
            out = encode(part)
            for j, cap in enumerate(part):
                table[cap] = {k: v[j].clone() for k, v in out.items()}
        self.release_text_encoders()
        logger.info("prompt states of %d distinct caption(s) encoded once; the text encoders leave the device",
                    len(distinct))
        return PromptTable(table)

    def cache_encoders(self):
        from ..data.cache import model_key_parts, vae_moments_fn

        a, rt, fam = self.args, self.rt, self.family
        parts = ("vae",) + fam.text_encoders + tuple(fam.tokenizer_of(n) for n in fam.text_encoders)
        key = {**model_key_parts(a.pretrained_model_name_or_path, components=parts), "kind": fam.name,
               "weight_dtype": str(rt.weight_dtype), "max_sequence_length": a.max_sequence_length}
        vae_encode = vae_moments_fn(self.vae, rt.device, self.vae.dtype)

        def encode_images(pixels):
            with no_autocast(rt.device):
                return vae_encode(pixels)
        tokenize = DiTTokenize(fam, self.tokenizers, a.max_sequence_length)
        return encode_images, prompts_fn(fam, tokenize, self.encoders), key

    def release_text_encoders(self) -> None:
        """Every text encoder (T5 is the big one) leaves the device once the prompts are encoded."""
        from .. import device as dev

        for m in self.encoders.values():
            m.to("cpu")
        self.text_released = True
        dev.empty_cache(self.rt.device)

    def release_encoders(self) -> None:
        """After the latent cache is built: the text encoders and the VAE leave the device; validation brings
        them back for its images (and :meth:`after_validation` sends them away again)."""
        self.vae.to("cpu")
        self.release_text_encoders()

    def after_validation(self) -> None:
        if self.args.cache_latents:
            self.release_encoders()
        elif getattr(self, "text_released", False):
            self.release_text_encoders()

    # ---------------------------------------------------------------------------------------- pipelines
    def dit_pipeline(self, transformer=None, class_name: Optional[str] = None, encoders: Optional[dict] = None,
                     **extra):
        """The family's pipeline (or ``class_name``) over the models being trained, with the base model's
        scheduler; the VAE decodes in fp32 outside the training autocast."""
        import diffusers

        cls = getattr(diffusers, class_name or self.family.pipeline_class)
        encoders = dict(self.encoders, **(encoders or {}))
        for m in list(encoders.values()) + [self.vae]:
            m.to(self.rt.device)
        tokenizers = {self.family.tokenizer_of(n): t for n, t in self.tokenizers.items()}
        pipe = cls(vae=self.vae, transformer=transformer or self.transformer, **encoders, **tokenizers,
                   scheduler=base_scheduler(self.args.pretrained_model_name_or_path, self.noise_scheduler), **extra)
        decode_outside_autocast(pipe.vae, self.rt.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        return self.dit_pipeline(encoders=self.trained_text_encoders())

    def trained_text_encoders(self) -> Dict[str, torch.nn.Module]:
        """The CLIP encoders that train (``--train_text_encoder``), by pipeline name."""
        if not getattr(self.args, "train_text_encoder", False):
            return {}
        return {n: self.encoders[n] for n in self.family.clip}

    def attention_models(self):
        return [self.transformer, self.vae]

    def checkpointing_models(self):
        return [self.transformer] + list(self.trained_text_encoders().values())

    def compile_models(self):
        return [self.transformer]

    def ema_model(self):
        return self.transformer

    # ------------------------------------------------------------------------------------------ outputs
    def save_pipeline_output(self, folder: str) -> List[str]:
        """The final full pipeline (the transformer gathered when sharded), main process. Frozen text encoders
        ran in the autocast dtype; the output carries the base model's weights."""
        from . import weights

        a, fam = self.args, self.family

        def build(transformer, **trained):
            encoders = dict(trained)
            for n, m in self.encoders.items():
                if n not in encoders and m.dtype != torch.float32:
                    encoders[n] = load_component(n, a.pretrained_model_name_or_path, a.revision, a.variant,
                                                 cls_name=fam.classes[n])
            return self.dit_pipeline(transformer=transformer, encoders=encoders)

        weights.save_pipeline(folder, self.rt.is_main, build,
                              {"transformer": self.transformer, **self.trained_text_encoders()}, a.save_consolidated)
        if not self.rt.is_main:
            return []
        files = sorted(os.listdir(folder))
        self.training_info(folder, "pipeline", files)
        return files

    def save_lora_output(self, folder: str, final: bool) -> List[str]:
        """``pytorch_lora_weights.safetensors`` (transformer + trained CLIP encoders) for the family pipeline's
        ``load_lora_weights``; checkpoints also keep the exact adapters for the resume."""
        from .tasks import lora

        models = {"transformer": self.transformer, **self.trained_text_encoders()}
        files = lora.save_lora_layers(folder, self.rt, self.family.pipeline_class, models)
        if final and self.rt.is_main:
            os.remove(os.path.join(folder, lora.ADAPTERS_NAME))  # resume-only; the output is the LoRA file
            files = [lora.LORA_WEIGHTS_NAME]
            self.training_info(folder, "lora", files, rank=self.args.lora_rank,
                               text_encoders=bool(self.trained_text_encoders()),
                               load_with=f"{self.family.pipeline_class}.load_lora_weights(this_folder)")
        return files

    def load_lora_trained(self, folder: str) -> None:
        from .tasks import lora

        lora.load_lora_layers(folder, {"transformer": self.transformer, **self.trained_text_encoders()})


__all__ = ["DiTModule", "DiTTask", "DiTTokenize", "FAMILIES", "FLUX", "Family", "PromptTable", "SD3",
           "add_dit_arguments",
           "prompts_fn"]
