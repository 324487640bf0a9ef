"""What every Stable Diffusion XL task shares (the SDXL counterpart of :mod:`.sd`).

SDXL differs from SD 1.x/2.x in what conditions the UNet:

* two text encoders (``CLIPTextModel`` + ``CLIPTextModelWithProjection``, each with its tokenizer): the prompt
  states are both encoders' *penultimate* hidden states side by side, and encoder 2's pooled, projected
  output (``text_embeds``) joins the time embedding;
* micro-conditioning ``time_ids`` = (original height, width, crop top, left, target height, width) PER
  SAMPLE, taken from the crop the data layer really made (it records them on every example, cached or not);
* the VAE runs in fp32 outside autocast (SDXL's VAE overflows in fp16) unless
  ``--pretrained_vae_model_name_or_path`` gives an fp16-safe one, which then runs in the training precision.

Also here: the timestep-bias sampling of upstream's SDXL script (``--timestep_bias_*``) and the SDXL
pipelines over the models being trained (the base model's scheduler and ``force_zeros_for_empty_prompt``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch

from ..data.dataset import ClipTokenize
from ..errors import ModelError, UsageError
from ..model_folder import check_pipeline_folder, looks_local, read_model_index
from .objective import Objective
from .sd import FLAG, DiffusionTask, SDModule, base_scheduler, load_component

logger = logging.getLogger(__name__)

SDXL_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
                "tokenizer_2": "CLIPTokenizer", "scheduler": "DDPMScheduler"}
VAE_FLAG = "--pretrained_vae_model_name_or_path"


# ------------------------------------------------------------------------------------------- conditioning
class SdxlTokenize:
    """``tokenize`` for the data set: ``{"input_ids": ..., "input_ids_2": ...}`` (picklable for workers)."""

    def __init__(self, tokenizer, tokenizer_2):
        self.parts = (ClipTokenize(tokenizer, "input_ids"), ClipTokenize(tokenizer_2, "input_ids_2"))

    def __call__(self, caption: str) -> dict:
        out = {}
        for part in self.parts:
            out.update(part(caption))
        return out


def encode_prompt(text_encoders, input_ids) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, L, D1 + D2], pooled_prompt_embeds [B, P]) as SDXL's pipelines compute them: the
    penultimate hidden states of both encoders, and the projected pooled output of the last one."""
    states, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def time_ids(batch: dict, prefix: str = "", crop_override: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """[B, 6] float32 micro-conditioning of each sample: original (h, w), crop (top, left), target (h, w).
    ``crop_override``: upstream ControlNet-SDXL's ``--crops_coords_top_left_h/_w`` (one crop for every sample)."""
    crop = batch[f"{prefix}crop_top_left"]
    if crop_override is not None:
        crop = torch.tensor(crop_override, dtype=crop.dtype).expand_as(crop)
    return torch.cat([batch[f"{prefix}original_size"], crop, batch[f"{prefix}target_size"]], dim=1).float()


def no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda", "npu") \
        else contextlib.nullcontext()


def decode_outside_autocast(vae, device: torch.device) -> None:
    """Make ``vae.decode`` run in the VAE's own dtype outside any autocast: validation runs under the training
    autocast, so a fp32 VAE would otherwise decode in half precision (SDXL's and SD3's VAEs overflow in fp16)."""
    if getattr(vae, "_dnpu_decode_outside_autocast", False):
        return
    decode = vae.decode

    def decode_without_autocast(z, *args, **kwargs):
        with no_autocast(device):  # the latents come from the autocast model: bring them to the VAE
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_without_autocast
    vae._dnpu_decode_outside_autocast = True


def sdxl_prompts_fn(tokenizers, text_encoders, device):
    """``encode_prompts`` for the latent cache: ``{"prompt_embeds", "pooled_prompt_embeds"}`` (float32 CPU)."""
    @torch.no_grad()
    def encode(captions: list) -> dict:
        ids = [tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids.to(device) for tok in tokenizers]
        embeds, pooled = encode_prompt(text_encoders, ids)
        return {"prompt_embeds": embeds.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}
    return encode


class SDXLModule(SDModule):
    """Base of the SDXL tasks' modules. Trained text encoders (LoRA) are registered as ``text_encoder`` /
    ``text_encoder_2``; otherwise the frozen ones in ``frozen`` encode (or the cache already did)."""

    crop_override: Optional[Tuple[int, int]] = None

    def latents(self, batch, gens=None) -> torch.Tensor:
        if "latent_moments" in batch:
            return super().latents(batch, gens)
        vae = self.frozen.vae
        # The VAE keeps its own dtype (fp32 unless an fp16-safe VAE was given): no autocast around it.
        with torch.no_grad(), no_autocast(self.device):
            px = batch["pixel_values"].to(self.device, vae.dtype, non_blocking=True)
            dist = vae.encode(px).latent_dist
            z = dist.sample() if gens is None else dist.mean + dist.std * self.objective.randn(dist.std, gens)
        return z * vae.config.scaling_factor

    def text_encoders(self) -> List[torch.nn.Module]:
        trained = self._modules
        return [trained["text_encoder"] if "text_encoder" in trained else self.frozen.text_encoder,
                trained["text_encoder_2"] if "text_encoder_2" in trained else self.frozen.text_encoder_2]

    @property
    def trains_text(self) -> bool:
        return "text_encoder" in self._modules or "text_encoder_2" in self._modules

    @property
    def has_unused_parameters(self) -> bool:
        """SDXL reads the first text encoder's penultimate hidden states: the adapters of its last layer never
        get a gradient, which DDP must be told (Engine.make_accelerator)."""
        return "text_encoder" in self._modules

    def prompt(self, batch, prefix: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) of the batch: cached/precomputed, or encoded now (with
        gradients into trained encoders)."""
        if f"{prefix}prompt_embeds" in batch and not self.trains_text:
            return (batch[f"{prefix}prompt_embeds"].to(self.device, non_blocking=True),
                    batch[f"{prefix}pooled_prompt_embeds"].to(self.device, non_blocking=True))
        ids = [batch[f"{prefix}input_ids"], batch[f"{prefix}input_ids_2"]]
        with contextlib.nullcontext() if self.trains_text else torch.no_grad():
            return encode_prompt(self.text_encoders(), ids)

    def added_cond(self, batch, pooled: torch.Tensor, prefix: str = "") -> Dict[str, torch.Tensor]:
        return {"text_embeds": pooled, "time_ids": time_ids(batch, prefix, self.crop_override).to(self.device)}


# ------------------------------------------------------------------------------------------- timestep bias
def timestep_weights(strategy: str, num_timesteps: int, multiplier: float = 1.0, begin: int = 0,
                     end: int = 1000, portion: float = 0.25) -> torch.Tensor:
    """Sampling weights over the training timesteps (sum 1): ``later`` / ``earlier`` multiply the last / first
    ``portion`` of them by ``multiplier``, ``range`` the timesteps ``begin``..``end`` (inclusive); ``none`` is
    uniform. Upstream SDXL's --timestep_bias_* flags."""
    w = torch.ones(num_timesteps, dtype=torch.float64)
    if strategy == "none":
        return w / w.sum()
    if multiplier <= 0:
        raise UsageError(f"--timestep_bias_multiplier must be > 0 (got {multiplier}); to leave timesteps out use "
                         f"--timestep_bias_strategy range")
    if strategy in ("later", "earlier"):
        if not 0 < portion <= 1:
            raise UsageError(f"--timestep_bias_portion must be in (0, 1] (got {portion})")
        n = max(1, int(round(portion * num_timesteps)))
        part = slice(num_timesteps - n, num_timesteps) if strategy == "later" else slice(0, n)
    elif strategy == "range":
        if not 0 <= begin <= end < num_timesteps:
            raise UsageError(f"--timestep_bias_begin/--timestep_bias_end: need 0 <= begin <= end < {num_timesteps} "
                             f"(got {begin}..{end})")
        part = slice(begin, end + 1)
    else:
        raise UsageError(f"--timestep_bias_strategy: unknown strategy {strategy!r}")
    w[part] *= multiplier
    return w / w.sum()


class BiasedObjective(Objective):
    """The SD objective with timesteps drawn from :func:`timestep_weights` instead of uniformly."""

    def __init__(self, *args, weights: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = weights.float()

    def timesteps(self, n: int, device, gens=None) -> torch.Tensor:
        if gens is None:
            return torch.multinomial(self.weights, n, replacement=True).to(device)
        return torch.cat([torch.multinomial(self.weights, 1, generator=g) for g in gens]).to(device)


def add_timestep_bias_arguments(parser) -> None:
    g = parser.add_argument_group("timestep bias (SDXL)")
    g.add_argument("--timestep_bias_strategy", default="none", choices=["earlier", "later", "range", "none"],
                   help="sample some timesteps more often: 'later' (noisier, composition) or 'earlier' (details) "
                        "by --timestep_bias_portion, or 'range' (--timestep_bias_begin..end); none = uniform")
    g.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                   help="how much more often the biased timesteps are drawn (> 0; 2.0 = twice as often)")
    g.add_argument("--timestep_bias_begin", type=int, default=0, help="first timestep of the 'range' strategy")
    g.add_argument("--timestep_bias_end", type=int, default=1000,
                   help="last timestep (inclusive) of the 'range' strategy; clipped to the scheduler's last")
    g.add_argument("--timestep_bias_portion", type=float, default=0.25,
                   help="fraction of the timesteps the 'later'/'earlier' strategies bias")


def add_vae_argument(parser) -> None:
    parser.add_argument(VAE_FLAG, default=None, metavar="PATH",
                        help="a VAE folder or Hub id to use instead of the model's (an fp16-safe SDXL VAE such as "
                             "madebyollin/sdxl-vae-fp16-fix); it then runs in the training precision, the model's "
                             "own VAE always runs in fp32")


# ----------------------------------------------------------------------------------------------- the task
class SDXLTask(DiffusionTask):
    """Shared SDXL plumbing: components, tokenization, cache encoders, pipelines. Concrete tasks add their
    module's forward and their outputs (and may mix in an SD task for its flags and data)."""

    pipeline_class_name = "StableDiffusionXLPipeline"
    family = "sdxl"
    default_resolution = 1024  # SDXL's native size (upstream's default)

    @classmethod
    def prepare_embedded(cls, progress: bool = False) -> dict:
        from .. import embedded_sdxl

        return {**embedded_sdxl.prepare(progress=progress), "resolution": embedded_sdxl.RESOLUTION}

    # ------------------------------------------------------------------------------------------ models
    def load_components(self, unet_dtype: Optional[torch.dtype] = None) -> None:
        """tokenizers, noise_scheduler, both text encoders (autocast dtype), the VAE (fp32 unless
        --pretrained_vae_model_name_or_path), the UNet (``unet_dtype``, fp32 master weights by default)."""
        a, rt = self.args, self.rt
        path = a.pretrained_model_name_or_path
        vae_path = getattr(a, "pretrained_vae_model_name_or_path", None)
        if looks_local(path):
            index = read_model_index(path, FLAG)
            if index.get("text_encoder_2") is None and index.get("_class_name", "").startswith("StableDiffusion") \
                    and "XL" not in index.get("_class_name", ""):
                raise ModelError(f"{FLAG}: {path} is a {index['_class_name']} folder (one text encoder, no "
                                 f"text_encoder_2); the SDXL tasks need a Stable Diffusion XL model (train SD 1.x/2.x "
                                 f"with the tasks without _sdxl)")
            need = ("unet", "text_encoder", "text_encoder_2", "tokenizer_2", "scheduler") + \
                (() if vae_path else ("vae",)) + (() if a.tokenizer_name else ("tokenizer",))
            check_pipeline_folder(path, FLAG, need=need, class_names=SDXL_CLASSES,
                                  optional=("feature_extractor", "image_encoder") + (("vae",) if vae_path else ()))
        self.tokenizer = load_component("tokenizer", a.tokenizer_name or path, a.revision,
                                        subfolder=None if a.tokenizer_name else "tokenizer")
        self.tokenizer_2 = load_component("tokenizer_2", path, a.revision, cls_name="CLIPTokenizer")
        self.noise_scheduler = load_component("scheduler", path, a.revision)
        if a.prediction_type:
            self.noise_scheduler.register_to_config(prediction_type=a.prediction_type)
        self.text_encoder = load_component("text_encoder", path, a.revision, a.variant, torch_dtype=rt.weight_dtype)
        self.text_encoder_2 = load_component("text_encoder_2", path, a.revision, a.variant,
                                             cls_name="CLIPTextModelWithProjection", torch_dtype=rt.weight_dtype)
        if vae_path:
            self.vae = self.load_vae(vae_path, rt.weight_dtype)
        else:
            self.vae = load_component("vae", path, a.revision, a.variant)  # fp32: SDXL's VAE overflows in fp16
        self.unet = load_component("unet", path, a.non_ema_revision or a.revision, a.variant, torch_dtype=unet_dtype)
        for m in (self.vae, self.text_encoder, self.text_encoder_2):
            m.requires_grad_(False)
            m.eval()
            m.to(rt.device)
        self.unet.to(rt.device)
        self.force_zeros = self.base_force_zeros(path)

    def load_vae(self, vae_path: str, dtype: torch.dtype):
        """The user's VAE: a VAE folder (config.json), or a pipeline folder / Hub id with a ``vae`` subfolder."""
        a = self.args
        sub = "vae" if looks_local(vae_path) and os.path.isdir(os.path.join(vae_path, "vae")) else ""
        vae = load_component("vae", vae_path, a.revision, a.variant, subfolder=sub, torch_dtype=dtype)
        return vae.to(dtype)

    def base_force_zeros(self, path: str) -> bool:
        """The base pipeline's ``force_zeros_for_empty_prompt`` (SDXL 1.0: true), kept in saved pipelines."""
        try:
            if looks_local(path):
                with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
                    index = json.load(f)
            else:
                import diffusers

                index = diffusers.DiffusionPipeline.load_config(path, revision=self.args.revision)
            return bool(index.get("force_zeros_for_empty_prompt", True))
        except Exception:  # offline Hub id whose config is not cached: SDXL's default
            return True

    def objective(self) -> Objective:
        a = self.args
        strategy = getattr(a, "timestep_bias_strategy", "none") or "none"
        if strategy == "none":
            return super().objective()
        n = self.noise_scheduler.config.num_train_timesteps
        weights = timestep_weights(strategy, n, a.timestep_bias_multiplier, a.timestep_bias_begin,
                                   min(a.timestep_bias_end, n - 1), a.timestep_bias_portion)
        return BiasedObjective(self.noise_scheduler, seed=a.seed, snr_gamma=a.snr_gamma,
                               noise_offset=a.noise_offset, input_perturbation=a.input_perturbation,
                               per_sample_noise=a.per_sample_noise, weights=weights)

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --------------------------------------------------------------------------------------------- data
    def tokenizer_fn(self):
        return SdxlTokenize(self.tokenizer, self.tokenizer_2)

    def tokenize(self, caption: str) -> Dict[str, torch.Tensor]:
        return self.tokenizer_fn()(caption)

    def cache_encoders(self):
        from ..data.cache import files_signature, model_key_parts, vae_moments_fn

        a, rt = self.args, self.rt
        vae_path = getattr(a, "pretrained_vae_model_name_or_path", None)
        key = {**model_key_parts(a.pretrained_model_name_or_path,
                                 components=("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
               "tokenizer_name": a.tokenizer_name, "weight_dtype": str(rt.weight_dtype), "kind": "sdxl",
               "vae_path": vae_path, "vae_files": files_signature(vae_path) if vae_path else None}
        return (vae_moments_fn(self.vae, rt.device, self.vae.dtype),
                sdxl_prompts_fn((self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2),
                                rt.device), key)

    def release_encoders(self) -> None:
        for m in (self.vae, self.text_encoder, self.text_encoder_2):
            m.to("cpu")

    # ---------------------------------------------------------------------------------------- pipelines
    def sd_pipeline(self, unet=None, text_encoder=None, text_encoder_2=None, class_name=None, **extra):
        """An SDXL pipeline (``class_name``, default the task's) over the models being trained."""
        import diffusers

        cls = getattr(diffusers, class_name or self.pipeline_class_name)
        te, te2 = text_encoder or self.text_encoder, text_encoder_2 or self.text_encoder_2
        for m in (self.vae, te, te2):
            m.to(self.rt.device)
        pipe = cls(vae=self.vae, text_encoder=te, text_encoder_2=te2, tokenizer=self.tokenizer,
                   tokenizer_2=self.tokenizer_2, unet=unet or self.unet,
                   scheduler=base_scheduler(self.args.pretrained_model_name_or_path, self.noise_scheduler),
                   force_zeros_for_empty_prompt=self.force_zeros, add_watermarker=False, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        """The validation pipeline. Validation runs under the training autocast; the VAE's decode is taken out
        of it, so a fp32 VAE really decodes in fp32 (SDXL's VAE overflows in fp16)."""
        pipe = self.sd_pipeline()
        decode_outside_autocast(pipe.vae, self.rt.device)
        return pipe

    def lora_text_encoders(self) -> None:
        """LoRA on both text encoders' attention (``--train_text_encoder --use_lora``); the base weights stay in
        the autocast dtype (fp32 when sharded), the adapters train as fp32 master weights."""
        from .tasks import lora

        a = self.args
        for te in (self.text_encoder, self.text_encoder_2):
            if self.rt.sharded:  # FSDP shards them with the adapters: one dtype per unit
                te.to(torch.float32)
            lora.add_lora(te, a.lora_rank, a.lora_alpha, lora.TEXT_ENCODER_TARGETS, a.lora_dropout)
            te.train()

    def trained_text_encoders(self) -> dict:
        """``{"text_encoder": ..., "text_encoder_2": ...}`` when they train, else {}."""
        if not getattr(self.args, "train_text_encoder", False):
            return {}
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def save_lora_output(self, folder: str, final: bool) -> List[str]:
        """``pytorch_lora_weights.safetensors`` (UNet + trained text encoders) for
        ``StableDiffusionXLPipeline.load_lora_weights``; checkpoints also keep the exact adapters."""
        from .tasks import lora

        te = self.trained_text_encoders()
        files = lora.save_lora(folder, self.rt, self.unet, te.get("text_encoder"), "StableDiffusionXLPipeline",
                               te.get("text_encoder_2"))
        if final and self.rt.is_main:
            os.remove(os.path.join(folder, lora.ADAPTERS_NAME))  # resume-only; the output is the LoRA file
            files = [lora.LORA_WEIGHTS_NAME]
            self.training_info(folder, "lora", files, rank=self.args.lora_rank, text_encoders=bool(te),
                               load_with="StableDiffusionXLPipeline.load_lora_weights(this_folder)")
        return files

    def load_lora_trained(self, folder: str) -> None:
        from .tasks import lora

        te = self.trained_text_encoders()
        lora.load_lora(folder, self.unet, te.get("text_encoder"), te.get("text_encoder_2"))

    def save_pipeline_output(self, folder: str) -> List[str]:
        """The final full pipeline (the UNet gathered when sharded), main process."""
        from . import weights

        a = self.args

        def build(unet):
            te, te2 = self.text_encoder, self.text_encoder_2
            if te.dtype != torch.float32:  # they ran in the autocast dtype; the output keeps the base's weights
                path = a.pretrained_model_name_or_path
                te = load_component("text_encoder", path, a.revision, a.variant)
                te2 = load_component("text_encoder_2", path, a.revision, a.variant,
                                     cls_name=SDXL_CLASSES["text_encoder_2"])
            return self.sd_pipeline(unet=unet, text_encoder=te, text_encoder_2=te2)

        weights.save_pipeline(folder, self.rt.is_main, build, {"unet": self.unet}, a.save_consolidated)
        if not self.rt.is_main:
            return []
        files = sorted(os.listdir(folder))
        self.training_info(folder, "pipeline", files)
        return files


def check_sdxl_flags(task) -> None:
    """Flag combinations every SDXL task refuses, each naming the flag."""
    a = task.args
    if getattr(a, "train_text_encoder", False) and not getattr(a, "use_lora", False):
        raise UsageError("--train_text_encoder: SDXL trains its text encoders with LoRA only here; add --use_lora")
    if getattr(a, "train_text_encoder", False) and a.cache_latents:
        raise UsageError("--cache_latents stores the prompt states, which --train_text_encoder changes every step; "
                         "drop one")


__all__ = ["BiasedObjective", "SDXLModule", "SDXLTask", "SdxlTokenize", "add_timestep_bias_arguments",
           "add_vae_argument", "check_sdxl_flags", "decode_outside_autocast", "no_autocast", "encode_prompt", "sdxl_prompts_fn", "time_ids",
           "timestep_weights"]
