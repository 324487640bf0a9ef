"""ControlNet for Stable Diffusion 3 / 3.5 (upstream's ``train_controlnet_sd3.py``): an ``SD3ControlNetModel``
made from the frozen transformer (its patch / time / text embeddings and first blocks copied, the conditioning
input projection zeroed, so training starts exactly at the base model) steers the transformer through
``block_controlnet_hidden_states``, on the flow-matching objective.

The conditioning image is encoded by the VAE like the image (``(z - shift_factor) * scaling_factor``), as
upstream and ``StableDiffusion3ControlNetPipeline`` do. Data as in the other ControlNet tasks (a
``conditioning_image`` column, or conditioning derived from the image); each distinct caption is encoded once
and the text encoders (T5 included) leave the device. The output is an ``SD3ControlNetModel`` folder.
"""
from __future__ import annotations

import logging

import torch

from ...errors import ModelError
from ..dit import SD3, DiTModule, DiTTask, add_dit_arguments
from ..registry import LaunchProfile, register_task
from .controlnet import ControlNetTask

logger = logging.getLogger(__name__)

#: upstream's ControlNet depth (``SD3ControlNetModel.from_transformer``'s default), at most half the transformer's
#: blocks (see ``controlnet_from_transformer``)
CONTROLNET_LAYERS = 12


class ControlNetSD3Module(DiTModule):
    """The ControlNet is registered (trained); the transformer is frozen and only referred to."""

    family = SD3
    # SD3ControlNetModel builds every block with a text stream, and the last block's text output is discarded:
    # those weights never get a gradient, which DDP must be told (Engine.make_accelerator).
    has_unused_parameters = True

    def step_inputs(self, batch):
        """(noised sample, prompt_embeds, pooled_prompt_embeds, conditioning latents) of a batch."""
        gens = self.objective.generators(batch)
        latents = self.latents(batch, gens)
        embeds, pooled = self.prompt(batch)
        sample = self.objective.sample(latents, gens, self.image_seq_len(latents, self.frozen.transformer))
        # the conditioning image goes through the VAE like the image ([0, 1] -> [-1, 1] as the pipeline's
        # image processor does)
        cond_px = batch["conditioning_pixel_values"].to(self.device, non_blocking=True) * 2.0 - 1.0
        return sample, embeds, pooled, self.latents({"pixel_values": cond_px}, gens)

    def forward(self, batch):
        sample, embeds, pooled, cond = self.step_inputs(batch)
        transformer = self.frozen.transformer
        blocks = self.controlnet(hidden_states=sample.noisy, timestep=sample.timesteps, encoder_hidden_states=embeds,
                                 pooled_projections=pooled, controlnet_cond=cond, return_dict=False)[0]
        pred = transformer(hidden_states=sample.noisy, timestep=sample.timesteps, encoder_hidden_states=embeds,
                           pooled_projections=pooled, block_controlnet_hidden_states=[b.to(self.weight_dtype)
                                                                                       for b in blocks],
                           return_dict=False)[0]
        return self.objective.flow_loss(pred, sample), {}


@register_task
class ControlNetSD3Task(DiTTask, ControlNetTask):
    name = "controlnet_sd3"
    description = ("ControlNet for Stable Diffusion 3 / 3.5 (flow matching): train an SD3ControlNetModel that steers "
                   "the frozen transformer with a conditioning image.")
    example = "examples/controlnet/train_controlnet_sd3.py"
    launch = LaunchProfile(
        network="StableDiffusion3_controlnet", distributed="ddp",
        embedded={"train_batch_size": 16, "max_train_steps": 200, "learning_rate": 1e-4, "lr_scheduler": "constant",
                  "lr_warmup_steps": 0, "checkpointing_steps": 200, "max_sequence_length": 8},
        pretrained={"resolution": 1024, "train_batch_size": 1, "gradient_accumulation_steps": 4,
                    "mixed_precision": "bf16", "learning_rate": 1e-5, "lr_scheduler": "constant",
                    "lr_warmup_steps": 0, "max_train_steps": 15000, "checkpointing_steps": 500,
                    "gradient_checkpointing": True, "dataloader_num_workers": 4})
    # upstream's train_controlnet_sd3.py defaults
    defaults = {"learning_rate": 5e-6, "train_batch_size": 4, "num_train_epochs": 1, "output_dir": "controlnet-model",
                "validation_steps": 100, "tracker_project_name": "train_controlnet", "distributed": "ddp"}
    supports_cache = False
    supports_ema = False
    ema_refusal = "EMA averages the transformer's weights and the transformer stays frozen here"
    output_kind = "controlnet"

    @classmethod
    def prepare_embedded(cls, progress: bool = False) -> dict:
        from ... import embedded_sd3

        return {**embedded_sd3.prepare(progress=progress), "resolution": embedded_sd3.RESOLUTION}

    #: the ControlNet's and its pipeline's diffusers classes (the FLUX task swaps in its own)
    controlnet_class = "SD3ControlNetModel"
    controlnet_pipeline = "StableDiffusion3ControlNetPipeline"

    @classmethod
    def add_controlnet_dit_arguments(cls, parser, max_sequence_length: int = 77) -> None:
        """The ControlNet data / model flags and the SD3 / FLUX flags, worded for ``cls.controlnet_class``."""
        ControlNetTask.add_arguments(parser)
        for action in parser._actions:
            if action.dest == "controlnet_model_name_or_path":
                action.help = (f"start from this {cls.controlnet_class} instead of one made from the transformer "
                               f"({cls.controlnet_class}.from_transformer)")
        add_dit_arguments(parser, max_sequence_length)

    @classmethod
    def add_arguments(cls, parser) -> None:
        cls.add_controlnet_dit_arguments(parser)
        g = parser.add_argument_group("ControlNet SD3 (upstream flags)")
        g.add_argument("--num_extra_conditioning_channels", type=int, default=0,
                       help="extra channels of the conditioning input beyond the VAE latents' (0 for image "
                            "conditioning)")
        g.add_argument("--upcast_vae", action="store_true",
                       help="upstream: run the VAE in fp32; it always runs in fp32 here (outside autocast)")
        g.add_argument("--dataset_preprocess_batch_size", type=int, default=1000,
                       help="upstream: batch size of its up-front dataset preprocessing; samples are prepared on "
                            "the fly here, so it only bounds how many captions are encoded at once")

    def validate_args(self):
        super().validate_args()
        a = self.args
        if a.num_extra_conditioning_channels:
            from ...errors import UsageError

            raise UsageError("--num_extra_conditioning_channels: the conditioning here is an image encoded by the "
                             "VAE (its latent channels only); extra channels need a data layout this task does not "
                             "read")

    # ------------------------------------------------------------------------------------------ models
    module_class = ControlNetSD3Module

    def build_module(self):
        """The ControlNet (from --controlnet_model_name_or_path or :meth:`controlnet_from_transformer`, fp32
        master weights) and the frozen transformer in the autocast dtype."""
        import diffusers

        a, rt = self.args, self.rt
        self.load_components(transformer_dtype=torch.float32)
        self.check_transformer()
        if a.controlnet_model_name_or_path:
            try:
                cls = getattr(diffusers, self.controlnet_class)
                self.controlnet = cls.from_pretrained(a.controlnet_model_name_or_path)
            except Exception as e:
                raise ModelError(f"--controlnet_model_name_or_path: cannot load a {self.controlnet_class} from "
                                 f"{a.controlnet_model_name_or_path}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        else:  # made from the fp32 transformer, before it drops to the autocast dtype below
            self.controlnet = self.controlnet_from_transformer()
        self.controlnet.to(rt.device).train()
        self.transformer.requires_grad_(False).eval()
        if rt.weight_dtype != torch.float32:
            self.transformer.to(dtype=rt.weight_dtype)  # frozen, never wrapped by the engine
        return self.module_class(self.frozen(transformer=self.transformer), self.objective(), rt.weight_dtype,
                                 controlnet=self.controlnet)

    def check_transformer(self) -> None:
        n = self.transformer.config.num_layers
        if n < 2:  # SD3 adds ControlNet residuals to every block but its last, context-pre-only one
            raise ModelError(f"--pretrained_model_name_or_path: this SD3 transformer has {n} block; SD3 adds "
                             f"ControlNet residuals only to the blocks before its last one, so a ControlNet cannot "
                             f"steer it")

    def controlnet_from_transformer(self):
        from diffusers import SD3ControlNetModel

        # SD3 adds ControlNet output int(i * L / N) to block i of its N blocks, except the last (context-pre-only)
        # one; every one of the L outputs is read only if L <= N / 2 (SD3-medium: 24 blocks, 12 layers). More
        # layers would train blocks whose output no block reads (and DDP would stop on their missing gradients).
        layers = min(CONTROLNET_LAYERS, max(1, self.transformer.config.num_layers // 2))
        extra = self.args.num_extra_conditioning_channels
        return SD3ControlNetModel.from_transformer(self.transformer, num_layers=layers,
                                                   num_extra_conditioning_channels=extra)

    def attention_models(self):
        return [self.transformer, self.vae, self.controlnet]

    def checkpointing_models(self):
        return [self.controlnet]

    def compile_models(self):
        return [self.transformer, self.controlnet]

    def ema_model(self):
        return None

    # -------------------------------------------------------------------------------------------- data
    def tokenizer_fn(self):
        """Each distinct caption's prompt states, encoded once (T5 then leaves the device)."""
        if not hasattr(self, "_table"):
            from ...data.dataset import caption_options

            rows = self.load_rows()
            captions = [c for i, cell in enumerate(rows.ds[rows.caption_column])
                        for c in caption_options(cell, f"row {i} (column {rows.caption_column!r})")]
            self._table = self.prompt_table(captions + [""] if self.args.proportion_empty_prompts else captions,
                                            batch_size=getattr(self.args, "dataset_preprocess_batch_size", 64))
        return self._table

    # ------------------------------------------------------------------------------------------ outputs
    def pipeline(self):
        self.transformer.to(self.rt.device)
        return self.dit_pipeline(class_name=self.controlnet_pipeline, controlnet=self.controlnet)

    def validation_kwargs(self, index, prompt):
        return {"control_image": ControlNetTask.validation_kwargs(self, index, prompt)["image"]}

    def save_final(self, folder: str):
        files = ControlNetTask.save_final(self, folder)
        if self.rt.is_main:
            self.training_info(folder, "controlnet", files,
                               load_with=f"{self.controlnet_class}.from_pretrained(this_folder)")
        return files

    def summary_extra(self):
        return {"conditioning": getattr(self, "conditioning_source", None),
                "controlnet_layers": self.controlnet.config.num_layers if getattr(self, "controlnet", None) else None}
