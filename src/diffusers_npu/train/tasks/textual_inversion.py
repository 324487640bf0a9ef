"""Textual inversion: learn the embedding of a new token (or ``--num_vectors`` tokens) for a concept.

The placeholder token(s) are added to the tokenizer, the embedding matrix grows by as many rows, and the new
rows start as a copy of ``--initializer_token``. Only the embedding matrix trains; after every optimizer step
all other rows are copied back from the original, so they stay bit-identical (AdamW's weight decay touches
them too). The result is ``learned_embeds.safetensors`` = ``{placeholder_token: tensor[num_vectors, dim]}``,
loadable with ``pipeline.load_textual_inversion(path)`` and ``test_infer/textual-inversion.py``; every
``--save_steps`` steps a ``learned_embeds-steps-N.safetensors`` is written too, as upstream does.

Data: ``--train_data_dir`` (a folder of images), or the images of ``--data_label`` (default 7) of the data
source, the embedded digits by default. Captions come from short templates ("a photo of a {}") whose words
the embedded model's whole-word tokenizer knows.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch

from ...data.images import list_images, load_pil, resize_crop, to_tensor
from ...errors import CheckpointError, DataError, UsageError
from .. import weights
from ..registry import LaunchProfile, register_task
from ..sd import DiffusionTask, Frozen, SDModule, add_data_label_argument, load_component, source_images

logger = logging.getLogger(__name__)

TEMPLATES = {
    "object": ("a photo of a {}", "a picture of a {}", "a photo of the {}", "a picture of the {}",
               "a photo of {}", "a handwritten {}", "a {}", "the {}"),
    "style": ("a picture in the style of {}", "a photo in the style of {}", "a digit in the style of {}",
              "a handwritten digit in the style of {}", "the style of {}", "a picture of a digit in the style of {}"),
}
LEARNED_EMBEDS_NAME = "learned_embeds.safetensors"


class TextualInversionDataset(torch.utils.data.Dataset):
    """Each image ``repeats`` times per epoch, with a caption template chosen per (epoch, index)."""

    def __init__(self, images, captions_ids, resolution, center_crop, random_flip, seed, repeats, interpolation):
        self.images, self.captions_ids, self.repeats = images, captions_ids, repeats
        self.opts = dict(resolution=resolution, center_crop=center_crop, random_flip=random_flip, seed=seed,
                         interpolation=interpolation)

    def __len__(self):
        return len(self.images) * self.repeats

    def __getitem__(self, key):
        from ...data.dataset import sample_rng

        epoch, index = key[0], key[1]
        o = self.opts
        i = index % len(self.images)
        flip = o["random_flip"] and sample_rng(o["seed"], epoch, index, "flip").random() < 0.5
        img, _, _ = resize_crop(load_pil(self.images[i], f"image {i} of the training images"),
                                (o["resolution"], o["resolution"]), o["center_crop"],
                                sample_rng(o["seed"], epoch, index, "crop"), o["interpolation"], flip=flip)
        which = sample_rng(o["seed"], epoch, index, "template").randrange(len(self.captions_ids))
        return {"pixel_values": to_tensor(img), "input_ids": self.captions_ids[which], "index": index,
                "epoch": epoch, "bad": 0}


class TextualInversionModule(SDModule):
    """The embedding matrix is the only registered (trained) part; gradients reach it through the frozen
    text encoder that uses it."""

    def forward(self, batch):
        gens = self.objective.generators(batch)
        noisy, t, target = self.objective.noisy(self.latents(batch, gens), gens)
        states = self.frozen.text_encoder(batch["input_ids"].to(self.device))[0]
        pred = self.frozen.unet(noisy, t, states, return_dict=False)[0]
        return self.objective.loss(pred, target, t), {}


@register_task
class TextualInversionTask(DiffusionTask):
    name = "textual_inversion"
    description = "Textual inversion: learn the embedding of a new token for a concept from a few images."
    example = "examples/textual_inversion/textual_inversion.py"
    launch = LaunchProfile(
        network="StableDiffusion_textual_inversion",
        embedded={"train_batch_size": 8, "max_train_steps": 500, "learning_rate": 5e-3, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "checkpointing_steps": 500},
        pretrained={"resolution": 512, "train_batch_size": 1, "max_train_steps": 3000, "learning_rate": 5e-4,
                    "lr_scheduler": "constant", "lr_warmup_steps": 0, "checkpointing_steps": 500,
                    "gradient_accumulation_steps": 4, "scale_lr": True, "placeholder_token": "<cat-toy>",
                    "initializer_token": "toy"})
    # upstream's textual inversion does not clip gradients
    defaults = {"max_train_steps": 5000, "output_dir": "text-inversion-model", "validation_steps": 100,
                "max_grad_norm": 0.0}
    supports_ema = False
    ema_refusal = "only the new token's embedding trains; the UNet stays frozen"
    output_kind = "textual_inversion"

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("textual inversion")
        g.add_argument("--placeholder_token", default="<digit-x>", help="the new token that names the concept")
        g.add_argument("--initializer_token", default="digit",
                       help="an existing single-token word whose embedding initialises the new token(s)")
        g.add_argument("--learnable_property", default="object", choices=sorted(TEMPLATES),
                       help="caption templates: an 'object' or a 'style'")
        g.add_argument("--num_vectors", type=int, default=1, help="embedding vectors learned for the concept")
        g.add_argument("--repeats", type=int, default=100, help="times each image appears per epoch")
        g.add_argument("--save_as_full_pipeline", action="store_true",
                       help="also save the whole pipeline (tokenizer and text encoder with the new token)")
        g.add_argument("--save_steps", type=int, default=500,
                       help="write learned_embeds-steps-N.safetensors into --output_dir every N steps (0: never)")
        g.add_argument("--no_safe_serialization", action="store_true",
                       help="write the learned embeddings as learned_embeds.bin (torch.save) instead of safetensors")
        add_data_label_argument(g)

    def validate_args(self):
        a = self.args
        if a.num_vectors < 1:
            raise UsageError(f"--num_vectors must be >= 1 (got {a.num_vectors})")
        if a.repeats < 1:
            raise UsageError(f"--repeats must be >= 1 (got {a.repeats})")
        if a.save_steps < 0:
            raise UsageError(f"--save_steps must be >= 0 (got {a.save_steps})")
        if not a.placeholder_token or any(c.isspace() for c in a.placeholder_token):
            raise UsageError(f"--placeholder_token must be one word without spaces (got {a.placeholder_token!r})")

    @property
    def embeds_name(self) -> str:
        return "learned_embeds.bin" if self.args.no_safe_serialization else LEARNED_EMBEDS_NAME

    # ------------------------------------------------------------------------------------------ models
    def build_module(self):
        a, rt = self.args, self.rt
        self.load_components(unet_dtype=rt.weight_dtype)  # frozen: run it in the autocast dtype
        # The text encoder holds the trained matrix: reload it at full precision (load_components cast it).
        self.text_encoder = load_component("text_encoder", a.pretrained_model_name_or_path, a.revision,
                                           a.variant).to(rt.device)
        self.unet.requires_grad_(False)
        tok = self.tokenizer
        self.placeholder_tokens = [a.placeholder_token] + [f"{a.placeholder_token}_{i}" for i in range(1, a.num_vectors)]
        init_ids = tok.encode(a.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise UsageError(f"--initializer_token {a.initializer_token!r} is {len(init_ids)} tokens for this "
                             f"tokenizer; it must be exactly one")
        # A word the tokenizer already has as one token would be hijacked in every prompt that uses it.
        known = any(len(tok.encode(t, add_special_tokens=False)) == 1 for t in self.placeholder_tokens)
        if known or tok.add_tokens(self.placeholder_tokens) != a.num_vectors:
            raise UsageError(f"--placeholder_token {a.placeholder_token!r} is already a token of the tokenizer; "
                             f"choose a new word, e.g. <{a.placeholder_token.strip('<>')}-concept>")
        self.placeholder_ids = tok.convert_tokens_to_ids(self.placeholder_tokens)
        self.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        emb = self.text_encoder.get_input_embeddings()
        with torch.no_grad():
            emb.weight[self.placeholder_ids] = emb.weight[init_ids[0]].clone()
        emb.weight.requires_grad_(True)
        self.embeddings = emb
        self.original = emb.weight.detach().clone()
        self.frozen_rows = torch.ones(emb.weight.shape[0], dtype=torch.bool, device=emb.weight.device)
        self.frozen_rows[self.placeholder_ids] = False
        logger.info("textual inversion: %s -> ids %s, initialised from %r", a.placeholder_token, self.placeholder_ids,
                    a.initializer_token)
        frozen = Frozen(vae=self.vae, text_encoder=self.text_encoder, unet=self.unet)
        return TextualInversionModule(frozen, self.objective(), rt.weight_dtype, token_embedding=emb)

    def checkpointing_models(self):
        return []  # the UNet is frozen; nothing that trains has blocks to recompute

    def ema_model(self):
        return None

    def after_optimizer_step(self, step: int) -> None:
        with torch.no_grad():  # every row but the new tokens' goes back to its original bits
            local = weights.local_tensor(self.embeddings.weight)
            if local.shape == self.frozen_rows.shape + local.shape[1:]:
                local[self.frozen_rows] = self.original[self.frozen_rows]
            else:  # a shard of the rows (FSDP): restore the rows this rank holds
                rows = local.shape[0]
                start = self.rt.rank * -(-self.original.shape[0] // self.rt.world_size)
                mask = self.frozen_rows[start:start + rows]
                local[mask] = self.original[start:start + rows][mask]
        if self.args.save_steps and step % self.args.save_steps == 0:
            self.write_embeds(os.path.join(self.args.output_dir, f"learned_embeds-steps-{step}" +
                                           os.path.splitext(self.embeds_name)[1]))

    def learned_embeds(self) -> torch.Tensor:
        full = weights.full_tensor(self.embeddings.weight)
        return full[self.placeholder_ids].detach().float().cpu().clone()

    def write_embeds(self, path: str) -> Optional[str]:
        embeds = {self.args.placeholder_token: self.learned_embeds()}
        if not self.rt.is_main:
            return None
        tmp = path + ".tmp"
        if self.args.no_safe_serialization or path.endswith(".bin"):
            torch.save(embeds, tmp)
        else:
            weights.save_state_dict(embeds, tmp)
        os.replace(tmp, path)
        self.rt.finished(path)
        return path

    # -------------------------------------------------------------------------------------------- data
    def caption_ids(self) -> List[torch.Tensor]:
        tok, placeholder = self.tokenizer, " ".join(self.placeholder_tokens)
        out = []
        for template in TEMPLATES[self.args.learnable_property]:
            ids = tok(template.format(placeholder), max_length=tok.model_max_length, padding="max_length",
                      truncation=True, return_tensors="pt").input_ids[0]
            if not all(i in ids.tolist() for i in self.placeholder_ids):
                raise DataError(f"--num_vectors {self.args.num_vectors}: the caption {template!r} no longer fits the "
                                f"tokenizer's {tok.model_max_length} tokens; use fewer vectors")
            out.append(ids)
        return out

    def build_dataset(self):
        a = self.args
        images = list_images(a.train_data_dir, "--train_data_dir") if a.train_data_dir else \
            source_images(a, "--train_data_dir")
        self.num_images = len(images)
        logger.info("textual inversion: %d training images", len(images))
        return TextualInversionDataset(images, self.caption_ids(), a.resolution, a.center_crop, a.random_flip, a.seed,
                                       a.repeats, a.image_interpolation_mode)

    # ------------------------------------------------------------------------------------------ outputs
    def save_trained(self, folder: str, ema_state=None) -> List[str]:
        path = self.write_embeds(os.path.join(folder, self.embeds_name))
        return [os.path.basename(path)] if path else []

    def load_trained(self, folder: str) -> Optional[dict]:
        from safetensors.torch import load_file

        path = os.path.join(folder, LEARNED_EMBEDS_NAME)
        bin_path = os.path.join(folder, "learned_embeds.bin")
        old = os.path.join(folder, "token_embedding.safetensors")
        if os.path.isfile(path) or os.path.isfile(bin_path):
            sd = load_file(path) if os.path.isfile(path) else torch.load(bin_path, map_location="cpu")
            rows = sd.get(self.args.placeholder_token)
            if rows is None or tuple(rows.shape) != (len(self.placeholder_ids), self.original.shape[1]):
                raise CheckpointError(f"--resume_from_checkpoint: {folder} holds no embedding of shape "
                                      f"({len(self.placeholder_ids)}, {self.original.shape[1]}) for "
                                      f"{self.args.placeholder_token!r} (another token or --num_vectors?)")
            full = self.original.clone()
            full[self.placeholder_ids] = rows.to(full.dtype).to(full.device)
            weights.load_state_into(self.embeddings, {"weight": full}, where=folder)
        elif os.path.isfile(old):  # earlier versions saved the whole matrix
            weights.load_pretrained(self.embeddings, folder, weights_name="token_embedding.safetensors")
        else:
            raise CheckpointError(f"--resume_from_checkpoint: {folder} has no {LEARNED_EMBEDS_NAME} (was it written by "
                                  f"another task?)")
        return None

    def pipeline(self):
        self.unet.to(self.rt.device)
        return self.sd_pipeline()

    def save_final(self, folder: str) -> List[str]:
        files = self.save_trained(folder)
        if self.args.save_as_full_pipeline:
            weights.save_pipeline(folder, self.rt.is_main, self.sd_pipeline, {"text_encoder": self.text_encoder},
                                  self.args.save_consolidated)
            if self.rt.is_main:
                files = sorted(os.listdir(folder))
        if self.rt.is_main:
            self.training_info(folder, "pipeline" if self.args.save_as_full_pipeline else "textual_inversion", files,
                               placeholder_token=self.args.placeholder_token, num_vectors=self.args.num_vectors,
                               load_with="pipeline.load_textual_inversion(this_folder + '/learned_embeds.safetensors')")
        return files

    def summary_extra(self):
        return {"placeholder_token": self.args.placeholder_token,
                "placeholder_ids": list(getattr(self, "placeholder_ids", [])),
                "training_images": getattr(self, "num_images", None)}
