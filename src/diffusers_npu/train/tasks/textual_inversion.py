"""Textual inversion: learn the embedding of a new token (or ``--num_vectors`` tokens) for a concept.

The placeholder token(s) are added to the tokenizer, the embedding matrix grows by as many rows, and the new
rows start as a copy of ``--initializer_token``. Only the embedding matrix trains; after every optimizer step
all other rows are copied back from the original, so they stay bit-identical (AdamW's weight decay touches
them too). The result is ``learned_embeds.safetensors`` = ``{placeholder_token: tensor[num_vectors, dim]}``,
loadable with ``pipeline.load_textual_inversion(path)`` and ``test_infer/textual-inversion.py --learned_embeds``.

Data: ``--train_data_dir`` (a folder of images), or the images of ``--data_label`` (default 7) of the data
source, the embedded digits by default. Captions come from short templates ("a photo of a {}") whose words the
embedded model's whole-word tokenizer knows.
"""
from __future__ import annotations

import logging
import os

import torch

from ..registry import LaunchProfile, register_task
from ..task import DiffusionTask, load_component
from .dreambooth import add_source_label_argument, images_from_source, list_images, load_image_tensor

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

    def __init__(self, images, captions_ids, resolution, center_crop, random_flip, seed, repeats):
        self.images, self.captions_ids, self.repeats = images, captions_ids, repeats
        self.opts = dict(resolution=resolution, center_crop=center_crop, random_flip=random_flip, seed=seed)

    def __len__(self):
        return len(self.images) * self.repeats

    def __getitem__(self, key):
        from ...data.dataset import sample_rng

        epoch, index = key if isinstance(key, tuple) else (0, key)
        i = index % len(self.images)
        pixels = load_image_tensor(self.images[i], f"image {i} of the training images", epoch=epoch, index=index,
                                   **self.opts)
        which = sample_rng(self.opts["seed"], epoch, index, "template").randrange(len(self.captions_ids))
        return {"pixel_values": pixels, "input_ids": self.captions_ids[which], "index": index, "epoch": epoch,
                "bad": 0}


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
    supports_cache = False

    @staticmethod
    def add_arguments(parser) -> None:
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
        add_source_label_argument(g)

    def validate_args(self):
        from ..args import ConfigError

        a = self.args
        if a.num_vectors < 1:
            raise ConfigError(f"--num_vectors must be >= 1 (got {a.num_vectors})")
        if a.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1 (got {a.repeats})")
        if a.use_ema:
            raise ConfigError("--use_ema averages UNet weights; textual inversion trains only the token embedding")
        if not a.placeholder_token or any(c.isspace() for c in a.placeholder_token):
            raise ConfigError(f"--placeholder_token must be one word without spaces (got {a.placeholder_token!r})")

    # ------------------------------------------------------------------------------------------------ models
    def load_models(self, device, weight_dtype):
        from ..args import ConfigError

        super().load_models(device, weight_dtype)
        a = self.args
        # The text encoder holds the trainable matrix: reload it at full precision (the base class cast it).
        self.text_encoder = load_component("text_encoder", a.pretrained_model_name_or_path, a.revision,
                                           a.variant).to(device)
        self.unet.requires_grad_(False)
        if weight_dtype != torch.float32:  # frozen: run it in the autocast dtype
            self.unet.to(dtype=weight_dtype)

        tok = self.tokenizer
        self.placeholder_tokens = [a.placeholder_token] + [f"{a.placeholder_token}_{i}"
                                                           for i in range(1, a.num_vectors)]
        init_ids = tok.encode(a.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ConfigError(f"--initializer_token {a.initializer_token!r} is {len(init_ids)} tokens for this "
                              f"tokenizer; it must be exactly one")
        # A word the tokenizer already has as one token would be hijacked in every prompt that uses it.
        known = any(len(tok.encode(t, add_special_tokens=False)) == 1 for t in self.placeholder_tokens)
        if known or tok.add_tokens(self.placeholder_tokens) != a.num_vectors:
            raise ConfigError(f"--placeholder_token {a.placeholder_token!r} is already a token of the tokenizer; "
                              f"choose a new word, e.g. <{a.placeholder_token.strip('<>')}-concept>")
        self.placeholder_ids = tok.convert_tokens_to_ids(self.placeholder_tokens)
        self.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        self.text_encoder.requires_grad_(False)
        emb = self.text_encoder.get_input_embeddings()
        with torch.no_grad():
            emb.weight[self.placeholder_ids] = emb.weight[init_ids[0]].clone()
        emb.weight.requires_grad_(True)
        self.embeddings = emb
        self.original = emb.weight.detach().clone()
        self.frozen_rows = torch.ones(emb.weight.shape[0], dtype=torch.bool, device=emb.weight.device)
        self.frozen_rows[self.placeholder_ids] = False
        logger.info("textual inversion: %s -> ids %s, initialised from %r", a.placeholder_token,
                    self.placeholder_ids, a.initializer_token)

    def trainable_modules(self):
        return {"token_embedding": self.embeddings}

    def after_optimizer_step(self):
        with torch.no_grad():  # every row but the new tokens' goes back to its original bits
            self.embeddings.weight[self.frozen_rows] = self.original[self.frozen_rows]

    def learned_embeds(self) -> torch.Tensor:
        return self.embeddings.weight[self.placeholder_ids].detach().float().cpu().clone()

    # -------------------------------------------------------------------------------------------------- data
    def caption_ids(self) -> list[torch.Tensor]:
        from ...data.sources import DataError

        tok, placeholder = self.tokenizer, " ".join(self.placeholder_tokens)
        out = []
        for template in TEMPLATES[self.args.learnable_property]:
            ids = tok(template.format(placeholder), max_length=tok.model_max_length, padding="max_length",
                      truncation=True, return_tensors="pt").input_ids[0]
            if not all(i in ids.tolist() for i in self.placeholder_ids):
                raise DataError(f"--num_vectors {self.args.num_vectors}: the caption {template!r} no longer fits "
                                f"the tokenizer's {tok.model_max_length} tokens; use fewer vectors")
            out.append(ids)
        return out

    def build_dataset(self):
        a = self.args
        images = list_images(a.train_data_dir, "--train_data_dir") if a.train_data_dir else \
            images_from_source(a, "--train_data_dir")
        self.num_images = len(images)
        logger.info("textual inversion: %d training images", len(images))
        return TextualInversionDataset(images, self.caption_ids(), a.resolution, a.center_crop, a.random_flip,
                                       a.seed, a.repeats)

    def compute_loss(self, batch, generator=None):
        gens = self._per_sample_generators(batch)  # --per_sample_noise
        noisy, t, target = self.noisy_latents(self.latents_from_batch(batch, gens), gens)
        # Not text_embeddings(): that runs without gradients, and here they must reach the embedding matrix.
        states = self.text_encoder(batch["input_ids"].to(self.device))[0]
        return self.diffusion_loss(self.unet(noisy, t, states).sample, target, t), {}

    # ------------------------------------------------------------------------------------------------ output
    def build_pipeline(self, unet):
        return self.make_sd_pipeline(unet)

    def save_final(self, folder, pipeline):
        from safetensors.torch import save_file

        save_file({self.args.placeholder_token: self.learned_embeds()}, os.path.join(folder, LEARNED_EMBEDS_NAME))
        if self.args.save_as_full_pipeline:
            pipeline.save_pretrained(folder, safe_serialization=True)

    def summary_extra(self):
        return {"placeholder_token": self.args.placeholder_token, "placeholder_ids": list(self.placeholder_ids),
                "training_images": getattr(self, "num_images", None)}
