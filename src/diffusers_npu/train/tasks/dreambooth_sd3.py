"""DreamBooth for Stable Diffusion 3 / 3.5 on the flow-matching objective: upstream's
``train_dreambooth_sd3.py`` (full fine-tuning of the transformer, optionally of both CLIP text encoders) and
``train_dreambooth_lora_sd3.py`` (LoRA in the transformer, optionally in both CLIP encoders; T5 stays frozen).

Instance images come from ``--instance_data_dir`` (every image with ``--instance_prompt``) or, as upstream, from
``--dataset_name`` (``--image_column``; per-image captions from ``--caption_column`` when given, else the
instance prompt; ``--repeats``). Prior preservation generates the missing class images once with the
pipeline being trained (:class:`~.dreambooth.DreamBoothTask`'s generator) and adds ``--prior_loss_weight`` x
the class loss. Each distinct prompt is encoded once (T5 included) and the text encoders then leave the device;
with ``--cache_latents`` the latent cache stores the VAE posteriors and the prompt states instead.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch

from ...errors import DataError, UsageError
from .. import weights
from ..dit import SD3, DiTModule, DiTTask, add_dit_arguments
from ..registry import LaunchProfile, register_task
from ..sd import load_unet_like, save_unet_like
from . import lora
from .dreambooth import DreamBoothTask, add_prior_preservation_arguments, resolve_prior_preservation
from .dreambooth_lora_sdxl import add_prodigy_arguments

logger = logging.getLogger(__name__)


class PriorPairs(torch.utils.data.Dataset):
    """Instance examples, each with a class example under ``class_``-prefixed keys (prior preservation)."""

    def __init__(self, instance, klass):
        self.instance, self.klass = instance, klass

    def __len__(self):
        return max(len(self.instance), len(self.klass))

    def __getitem__(self, key):
        epoch, index = int(key[0]), int(key[1])
        out = self.instance[(epoch, index % len(self.instance))]
        other = self.klass[(epoch, index % len(self.klass))]
        out.update({f"class_{k}": v for k, v in other.items() if isinstance(v, torch.Tensor)
                    and k not in ("index", "epoch")})
        out["index"] = index
        return out


class DreamBoothSD3Module(DiTModule):
    """forward(batch) -> (instance + w * prior loss, {instance_loss[, prior_loss]}); instance and class samples
    go through the transformer in one forward."""

    family = SD3

    def __init__(self, *args, prior_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_loss_weight = prior_loss_weight

    def forward(self, batch):
        prior = "class_pixel_values" in batch
        n = batch["latent_moments" if "latent_moments" in batch else "pixel_values"].shape[0]
        embeds, pooled = self.prompt(batch)
        source = batch
        if prior:
            class_embeds, class_pooled = self.prompt(batch, "class_")
            embeds, pooled = torch.cat([embeds, class_embeds]), torch.cat([pooled, class_pooled])
            source = {"pixel_values": torch.cat([batch["pixel_values"], batch["class_pixel_values"]])}
        gens = self.objective.prior_generators(batch, prior)
        latents = self.latents(source, gens)
        sample = self.objective.sample(latents, gens, self.image_seq_len(latents, self.transformer))
        per = self.objective.flow_loss(self.denoise(sample, embeds, pooled), sample, reduce=False)
        return self.objective.prior_preservation(per, n, self.prior_loss_weight)

    def denoise(self, sample, embeds, pooled) -> torch.Tensor:
        """The transformer's prediction for ``sample`` (FLUX packs latents here: dreambooth_flux.py)."""
        return self.transformer(hidden_states=sample.noisy, timestep=sample.timesteps, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]


def add_dreambooth_sd3_arguments(parser, lora_script: bool) -> None:
    g = parser.add_argument_group("DreamBooth SD3 (upstream flags)")
    g.add_argument("--instance_data_dir", default=None, metavar="FOLDER",
                   help="folder of the subject's images (each trained with --instance_prompt); or give --dataset_name")
    g.add_argument("--instance_prompt", default="a photo of sks digit",
                   help="prompt with the identifier that names the subject (used for images without a caption)")
    g.add_argument("--repeats", type=int, default=1, help="how many times each instance image is repeated per epoch")
    add_prior_preservation_arguments(g, class_inference_steps=28, steps_note=" (the SD3 pipeline's default)")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="train both CLIP text encoders too (LoRA in the LoRA script, full weights in the full one); "
                        "T5 stays frozen, as upstream")
    g.add_argument("--text_encoder_lr", type=float, default=5e-6, help="learning rate of the trained text encoders")
    g.add_argument("--adam_weight_decay_text_encoder", type=float, default=1e-3,
                   help="weight decay of the trained text encoders")
    add_prodigy_arguments(g.add_argument)
    add_dit_arguments(parser)
    if lora_script:
        lg = parser.add_argument_group("LoRA (upstream flags)")
        lg.add_argument("--rank", "--lora_rank", dest="lora_rank", type=int, default=4, metavar="R",
                        help="rank of the LoRA adapters (alpha = rank, as upstream)")
        lg.add_argument("--lora_alpha", type=float, default=None,
                        help="LoRA scaling numerator (effective scale alpha/rank); default: the rank (scale 1)")
        lg.add_argument("--lora_dropout", type=float, default=0.0, help="dropout probability of the LoRA layers")
        lg.add_argument("--lora_layers", default=None,
                        help="comma-separated transformer modules that get adapters; default: the attention "
                             "projections " + ",".join(SD3.lora_targets))
        lg.add_argument("--lora_blocks", default=None,
                        help="comma-separated transformer block numbers that get adapters (e.g. '12,30'); "
                             "default: every block")
        lg.add_argument("--upcast_before_saving", action="store_true",
                        help="upstream: cast the transformer to fp32 before saving the LoRA; the adapters are fp32 "
                             "master weights here, so they are always saved in fp32")


@register_task
class DreamBoothSD3Task(DiTTask):
    name = "dreambooth_sd3"
    description = ("DreamBooth for Stable Diffusion 3 / 3.5 (flow matching): fine-tune the transformer on a subject's "
                   "images (optionally both CLIP text encoders), with prior preservation.")
    example = "examples/dreambooth/train_dreambooth_sd3.py"
    launch = LaunchProfile(
        network="StableDiffusion3_dreambooth", distributed="fsdp", learning_check=True,
        embedded={"config": "examples/dreambooth/configs/embedded_digits_sd3.yaml"},
        # MindSpeed-MM's SD3-medium DreamBooth row: 1024 px, batch 4 per device, bf16
        pretrained={"resolution": 1024, "train_batch_size": 4, "mixed_precision": "bf16", "learning_rate": 1e-4,
                    "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_train_steps": 500,
                    "gradient_checkpointing": True, "checkpointing_steps": 500,
                    "instance_prompt": "a photo of sks dog"})
    # upstream train_dreambooth_sd3.py defaults (the LoRA script's are the same)
    defaults = {"learning_rate": 1e-4, "output_dir": "sd3-dreambooth", "train_batch_size": 4, "num_train_epochs": 1,
                "adam_weight_decay": 1e-4, "caption_column": None, "validation_epochs": 50, "distributed": "fsdp"}
    supports_cache = True
    uses_lora = False
    module_class = DreamBoothSD3Module  # the FLUX tasks (dreambooth_flux.py) swap in their packing forward
    # DreamBooth's class images: generated once with the pipeline being trained, reused on later runs
    class_images = DreamBoothTask.class_images
    generate_class_images = DreamBoothTask.generate_class_images

    @classmethod
    def prepare_embedded(cls, progress: bool = False) -> dict:
        from ... import embedded_sd3

        return {**embedded_sd3.prepare(progress=progress), "resolution": embedded_sd3.RESOLUTION}

    @classmethod
    def add_arguments(cls, parser) -> None:
        add_dreambooth_sd3_arguments(parser, lora_script=cls.uses_lora)

    @property
    def output_kind(self) -> str:  # noqa: D102
        return "lora" if self.uses_lora else "pipeline"

    def validate_args(self) -> None:
        a = self.args
        if a.repeats < 1:
            raise UsageError(f"--repeats must be >= 1 (got {a.repeats})")
        if a.instance_data_dir and a.dataset_name:
            raise UsageError("give the instance images once: --instance_data_dir or --dataset_name, not both")
        if self.uses_lora:
            if a.lora_rank < 1:
                raise UsageError(f"--rank must be >= 1 (got {a.lora_rank})")
            if not 0.0 <= a.lora_dropout < 1.0:
                raise UsageError(f"--lora_dropout must be in [0, 1) (got {a.lora_dropout})")
            if a.use_ema:
                raise UsageError("--use_ema averages full weights; the LoRA script trains only adapters (drop it)")
        resolve_prior_preservation(a)
        if a.with_prior_preservation and a.cache_latents:
            raise UsageError("--cache_latents caches one image per sample; with --with_prior_preservation each "
                             "sample also carries a class image (drop one)")
        if a.train_text_encoder and a.cache_latents:
            raise UsageError("--cache_latents stores the prompt states, which --train_text_encoder changes every "
                             "step; drop one")
        if a.use_ema and a.train_text_encoder:
            raise UsageError("--use_ema averages the transformer only; it cannot be combined with "
                             "--train_text_encoder")
        if self.uses_lora and a.upcast_before_saving:
            logger.info("--upcast_before_saving: the LoRA adapters are fp32 master weights; they are saved in fp32")

    def optimizer_groups(self, params):
        """As upstream: trained text encoders get --text_encoder_lr and --adam_weight_decay_text_encoder."""
        a = self.args
        te = self.trained_text_encoders()
        if not te:
            return None
        ids = {id(p) for m in te.values() for p in m.parameters()}
        return [{"params": [p for p in params if id(p) not in ids]},
                {"params": [p for p in params if id(p) in ids], "lr": a.text_encoder_lr or a.learning_rate,
                 "weight_decay": a.adam_weight_decay_text_encoder}]

    # ------------------------------------------------------------------------------------------ models
    def lora_targets(self) -> List[str]:
        a = self.args
        layers = [s.strip() for s in a.lora_layers.split(",") if s.strip()] if a.lora_layers else list(SD3.lora_targets)
        if a.lora_blocks:
            try:
                blocks = [int(b) for b in a.lora_blocks.split(",") if b.strip()]
            except ValueError:
                raise UsageError(f"--lora_blocks: expected comma-separated block numbers, got {a.lora_blocks!r}") \
                    from None
            n = len(self.transformer.transformer_blocks)
            bad = [b for b in blocks if not 0 <= b < n]
            if bad:
                raise UsageError(f"--lora_blocks: this transformer has blocks 0..{n - 1}; got {bad}")
            layers = [f"transformer_blocks.{b}.{m}" for b in blocks for m in layers]
        return layers

    def build_module(self):
        a, rt = self.args, self.rt
        # LoRA: the frozen transformer runs in the autocast dtype (one dtype per unit when FSDP shards it)
        dtype = rt.weight_dtype if self.uses_lora and not rt.sharded else torch.float32
        self.load_components(transformer_dtype=dtype)
        trainable = {"transformer": self.transformer}
        if self.uses_lora:
            try:
                lora.add_lora(self.transformer, a.lora_rank, a.lora_alpha, self.lora_targets(), a.lora_dropout)
            except ValueError as e:
                raise UsageError(f"--lora_layers: {e}") from None
        for name, te in self.trained_text_encoders().items():
            te.to(dtype=torch.float32)  # trained weights are fp32 master weights
            if self.uses_lora:
                lora.add_lora(te, a.lora_rank, a.lora_alpha, lora.TEXT_ENCODER_TARGETS, a.lora_dropout)
            else:
                te.requires_grad_(True)
            te.train()
            trainable[name] = te
        return self.module_class(self.frozen(), self.objective(), rt.weight_dtype, **trainable,
                                 prior_loss_weight=a.prior_loss_weight)

    def ema_model(self):
        return None if self.uses_lora else self.transformer

    # -------------------------------------------------------------------------------------------- data
    def instance_rows(self):
        """A ``datasets.Dataset`` of instance images (column ``image``) and captions (column ``text``)."""
        from datasets import Dataset

        from ...data.images import list_images
        from ...data.sources import load_source, resolve_columns

        a = self.args
        if a.instance_data_dir:
            images = list_images(a.instance_data_dir, "--instance_data_dir")
            captions = [a.instance_prompt] * len(images)
        elif a.dataset_name or a.local_data_dir:
            ds = load_source(a.dataset_name, a.local_data_dir, None, a.dataset_config_name)
            image_column, _ = resolve_columns(ds, a.image_column, None, need_caption=False)
            if a.caption_column and a.caption_column not in ds.column_names:
                raise DataError(f"--caption_column: no column {a.caption_column!r}; the data set has columns: "
                                f"{', '.join(ds.column_names)}")
            if a.max_train_samples is not None:
                ds = ds.select(range(min(a.max_train_samples, len(ds))))
            from ...data.dataset import undecoded

            ds = undecoded(ds, [image_column])
            images = list(ds[image_column])
            captions = list(ds[a.caption_column]) if a.caption_column else [a.instance_prompt] * len(images)
        else:
            raise DataError("no instance images: give --instance_data_dir (a folder of images) or --dataset_name")
        n = len(images)
        return Dataset.from_dict({"image": images * a.repeats, "text": captions * a.repeats}), n

    def text_fn(self, captions):
        """What a sample carries for its caption: token ids when the CLIP encoders train, else the prompt states
        looked up in a table encoded once (None with --cache_latents: the cache encodes)."""
        a = self.args
        if self.trained_text_encoders():
            return self.tokenizer_fn()
        if a.cache_latents:
            return None
        if not hasattr(self, "_table"):
            self._table = self.prompt_table(captions)
        return self._table

    def build_dataset(self):
        from ...data.dataset import ImageCaptionDataset, caption_options

        a = self.args
        rows, self.num_instance = self.instance_rows()
        opts = dict(center_crop=a.center_crop, random_flip=a.random_flip, seed=a.seed,
                    skip_bad_images=a.skip_bad_images, interpolation=a.image_interpolation_mode)
        captions = [c for i, cell in enumerate(rows["text"]) for c in caption_options(cell, f"row {i}")]
        if a.proportion_empty_prompts:
            captions.append("")
        self.class_generated, self.num_class = 0, 0
        if a.with_prior_preservation:
            from datasets import Dataset

            class_images = self.class_images()
            self.num_class = len(class_images)
            captions.append(a.class_prompt)
            instance = ImageCaptionDataset(rows, "image", "text", a.resolution, tokenize=self.text_fn(captions),
                                           name="the instance images", proportion_empty_prompts=a.proportion_empty_prompts,
                                           **opts)
            klass = ImageCaptionDataset(Dataset.from_dict({"image": class_images,
                                                           "text": [a.class_prompt] * len(class_images)}),
                                        "image", "text", a.resolution, tokenize=self.text_fn(captions),
                                        name="the class images", **opts)
            return PriorPairs(instance, klass)
        return ImageCaptionDataset(rows, "image", "text", a.resolution, tokenize=self.text_fn(captions),
                                   name="the instance images", proportion_empty_prompts=a.proportion_empty_prompts,
                                   **opts)

    # ------------------------------------------------------------------------------------------ outputs
    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        if self.uses_lora:
            return self.save_lora_output(folder, final=False)
        files = save_unet_like(self.transformer, folder, self.rt, ema_state, name="transformer")
        for name, te in self.trained_text_encoders().items():
            weights.save_pretrained(te, os.path.join(folder, name), self.rt.is_main)
            files.append(name)
        return files

    def load_trained(self, folder: str) -> Optional[dict]:
        if self.uses_lora:
            self.load_lora_trained(folder)
            return None
        ema = load_unet_like(self.transformer, folder, name="transformer")
        for name, te in self.trained_text_encoders().items():
            weights.load_pretrained(te, os.path.join(folder, name))
        return ema

    def save_final(self, folder: str) -> List[str]:
        if self.uses_lora:
            return self.save_lora_output(folder, final=True)
        return self.save_pipeline_output(folder)

    def summary_extra(self) -> dict:
        return {"instance_images": getattr(self, "num_instance", None), "class_images": getattr(self, "num_class", 0),
                "class_images_generated": getattr(self, "class_generated", 0)}


@register_task
class DreamBoothLoraSD3Task(DreamBoothSD3Task):
    name = "dreambooth_lora_sd3"
    description = ("DreamBooth-LoRA for Stable Diffusion 3 / 3.5: LoRA adapters in the transformer (and both CLIP "
                   "encoders with --train_text_encoder) learn a subject; writes pytorch_lora_weights.safetensors.")
    example = "examples/dreambooth/train_dreambooth_lora_sd3.py"
    launch = LaunchProfile(
        network="StableDiffusion3_dreambooth_lora", distributed="ddp",
        embedded={"train_batch_size": 4, "max_train_steps": 200, "learning_rate": 1e-3, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "rank": 8, "with_prior_preservation": True, "num_class_images": 20,
                  "class_inference_steps": 10, "checkpointing_steps": 200, "max_sequence_length": 16},
        # MindSpeed-MM's SD3 DreamBooth-LoRA row: 1024 px, batch 8 per device, bf16
        pretrained={"resolution": 1024, "train_batch_size": 8, "mixed_precision": "bf16", "learning_rate": 4e-4,
                    "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_train_steps": 500,
                    "checkpointing_steps": 500, "instance_prompt": "a photo of sks dog"})
    defaults = dict(DreamBoothSD3Task.defaults, distributed="ddp")
    uses_lora = True
