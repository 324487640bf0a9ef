"""ControlNet for FLUX.1 (upstream's ``train_controlnet_flux.py``): a ``FluxControlNetModel`` made from the frozen
transformer (``FluxControlNetModel.from_transformer``: its embeddings and first ``--num_double_layers`` double-
stream / ``--num_single_layers`` single-stream blocks copied, its output projections and conditioning input
zeroed, so training starts exactly at the base model) steers the transformer through
``controlnet_block_samples`` / ``controlnet_single_block_samples``, on the flow-matching objective.

As upstream and ``FluxControlNetPipeline`` do, the conditioning image is encoded by the VAE like the image and
packed into 2x2 latent tokens; the step has FLUX's packing, image / text ids and guidance embedding
(``dreambooth_flux.py``). Data, prompt encoding (each distinct caption once, then T5 leaves the device),
checkpoints and validation are the SD3 ControlNet task's (``controlnet_sd3.py``). The output is a
``FluxControlNetModel`` folder.
"""
from __future__ import annotations

import logging
import os

import torch

from ...errors import ModelError, UsageError
from ..dit import FLUX
from ..registry import LaunchProfile, register_task
from .controlnet import ControlNetTask
from .controlnet_sd3 import ControlNetSD3Module, ControlNetSD3Task
from .dreambooth_flux import check_packing, flux_call, flux_pack, flux_unpack

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: upstream flags its script declares but never reads: accepted, and said so when given
UNREAD = ("pretrained_vae_model_name_or_path", "crops_coords_top_left_h", "crops_coords_top_left_w")


class ControlNetFluxModule(ControlNetSD3Module):
    """The ControlNet is registered (trained); the transformer is frozen and only referred to."""

    family = FLUX
    guidance_scale = 3.5

    def forward(self, batch):
        sample, embeds, pooled, cond = self.step_inputs(batch)  # cond: VAE latents, packed like the image's below
        transformer = self.frozen.transformer
        call = flux_call(sample.noisy, embeds, sample.timesteps, self.objective.num_train_timesteps,
                         transformer.config.guidance_embeds, self.guidance_scale)
        double, single = self.controlnet(**call, controlnet_cond=flux_pack(cond), pooled_projections=pooled,
                                         return_dict=False)
        dtype = self.weight_dtype
        pred = transformer(**call, pooled_projections=pooled,
                           controlnet_block_samples=[s.to(dtype) for s in double] if double is not None else None,
                           controlnet_single_block_samples=[s.to(dtype) for s in single] if single is not None
                           else None, return_dict=False)[0]
        return self.objective.flow_loss(flux_unpack(pred, sample.noisy), sample), {}


@register_task
class ControlNetFluxTask(ControlNetSD3Task):
    name = "controlnet_flux"
    description = ("ControlNet for FLUX.1 (flow matching, packed latents, guidance embedding): train a "
                   "FluxControlNetModel that steers the frozen transformer with a conditioning image.")
    example = "examples/controlnet/train_controlnet_flux.py"
    # upstream's README settings (512 px, batch 1 x 16 accumulation, bf16, cosine), 4 double / 0 single blocks;
    # 8 devices shard the ControlNet (the memory plan: with upstream's 4 + 4 blocks, 2.0 B trained parameters
    # beside the frozen 11.9 B transformer and T5 do not fit a 64 GB device replicated, they do under FSDP)
    launch = LaunchProfile(
        network="FLUX1_controlnet", distributed="fsdp",
        pretrained={"resolution": 512, "train_batch_size": 1, "gradient_accumulation_steps": 16,
                    "mixed_precision": "bf16", "learning_rate": 1e-5, "lr_scheduler": "cosine",
                    "lr_warmup_steps": 0, "max_train_steps": 15000, "checkpointing_steps": 200,
                    "num_double_layers": 4, "num_single_layers": 0, "gradient_checkpointing": True,
                    "dataloader_num_workers": 4})
    family = FLUX
    default_resolution = 512
    module_class = ControlNetFluxModule
    controlnet_class = "FluxControlNetModel"
    controlnet_pipeline = "FluxControlNetPipeline"
    uses_embedded_data = False  # there is no embedded FLUX model or data set
    weight_loss = False  # upstream: the plain MSE on the velocity, whatever --weighting_scheme
    # upstream train_controlnet_flux.py defaults
    # upstream train_controlnet_flux.py defaults (its images are always centre-cropped); sharded over several
    # processes (the launcher's plan)
    defaults = dict(ControlNetSD3Task.defaults, tracker_project_name="flux_train_controlnet",
                    num_validation_images=2, center_crop=True, distributed="fsdp")

    @classmethod
    def prepare_embedded(cls, progress: bool = False) -> dict:
        raise UsageError(f"{cls.name}: there is no embedded FLUX.1 model; pass a local FLUX.1 pipeline folder with "
                         "--pretrained_model_name_or_path and a data set with --dataset_name (or --jsonl_for_train)")

    @classmethod
    def add_arguments(cls, parser) -> None:
        # upstream encodes prompts with FluxPipeline.encode_prompt's default: 512 T5 tokens; its loss is the plain
        # MSE on the velocity (no preconditioning, no loss weighting)
        cls.add_controlnet_dit_arguments(parser, max_sequence_length=512)
        parser.set_defaults(precondition_outputs=0)
        for action in parser._actions:
            if action.dest == "weighting_scheme":
                action.help = ("density of the training timesteps (logit_normal / mode; sigma_sqrt / cosmap / none: "
                               "uniform); the loss is not weighted, as upstream's FLUX ControlNet script does not")
        g = parser.add_argument_group("ControlNet FLUX.1 (upstream flags)")
        g.add_argument("--num_double_layers", type=int, default=4,
                       help="double-stream blocks of the ControlNet (copied from the transformer's first ones)")
        g.add_argument("--num_single_layers", type=int, default=4,
                       help="single-stream blocks of the ControlNet (copied from the transformer's first ones)")
        g.add_argument("--guidance_scale", type=float, default=3.5,
                       help="guidance embedding value of every training sample (FLUX.1-dev is guidance-distilled; "
                            "ignored by transformers without guidance_embeds)")
        g.add_argument("--jsonl_for_train", default=None, metavar="FILE",
                       help="training rows from this JSON-lines file (image / conditioning image paths and "
                            "captions); the same as --dataset_name FILE")
        g.add_argument("--save_weight_dtype", default="fp32", choices=sorted(SAVE_DTYPES),
                       help="dtype of the final ControlNet; fp16 / bf16 are saved as that diffusers variant "
                            "(load with variant='fp16' / 'bf16')")
        g.add_argument("--enable_model_cpu_offload", action="store_true",
                       help="upstream: offload its validation pipeline; accepted, nothing is offloaded here (the "
                            "text encoders leave the device once the prompts are encoded)")
        g.add_argument("--use_adafactor", action="store_true",
                       help="upstream: transformers' Adafactor optimizer; not offered here (refused with the "
                            "optimizers that are)")
        g.add_argument("--pretrained_vae_model_name_or_path", default=None, metavar="PATH",
                       help="upstream declares it but its FLUX script never reads it: accepted, no effect")
        for flag in ("h", "w"):
            g.add_argument(f"--crops_coords_top_left_{flag}", type=int, default=0, metavar="PX",
                           help="upstream declares it but its FLUX script never reads it: accepted, no effect")

    @classmethod
    def resolve_args(cls, args) -> None:
        if args.jsonl_for_train:
            others = [f"--{k}" for k in ("dataset_name", "train_data_dir", "local_data_dir") if getattr(args, k, None)]
            if others:
                raise UsageError(f"--jsonl_for_train: give it or {others[0]}, not both (as upstream)")
            args.dataset_name = args.jsonl_for_train

    def validate_args(self):
        ControlNetTask.validate_args(self)
        a = self.args
        if a.use_adafactor:
            from ..args import OPTIMIZERS

            raise UsageError(f"--use_adafactor: Adafactor is not offered here; use --optimizer with one of "
                             f"{', '.join(OPTIMIZERS)}")
        for name, value in (("--num_double_layers", a.num_double_layers), ("--num_single_layers", a.num_single_layers)):
            if value < 0:
                raise UsageError(f"{name} {value}: a ControlNet has 0 or more such blocks")
        given = [f"--{k}" for k in UNREAD if getattr(a, k)]
        if given:
            logger.warning("%s: upstream's train_controlnet_flux.py declares but never reads it; no effect here either",
                           ", ".join(given))

    # ------------------------------------------------------------------------------------------ models
    def check_transformer(self) -> None:
        check_packing(self)
        a, cfg = self.args, self.transformer.config
        if a.controlnet_model_name_or_path:
            return
        for flag, want, have, kind in (("--num_double_layers", a.num_double_layers, cfg.num_layers, "double-stream"),
                                       ("--num_single_layers", a.num_single_layers, cfg.num_single_layers,
                                        "single-stream")):
            if want > have:
                raise ModelError(f"{flag} {want}: the transformer of {a.pretrained_model_name_or_path} has {have} "
                                 f"{kind} block(s); the ControlNet copies at most that many")

    def controlnet_from_transformer(self):
        from diffusers import FluxControlNetModel

        a, cfg = self.args, self.transformer.config
        return FluxControlNetModel.from_transformer(self.transformer, num_layers=a.num_double_layers,
                                                    num_single_layers=a.num_single_layers,
                                                    attention_head_dim=cfg.attention_head_dim,
                                                    num_attention_heads=cfg.num_attention_heads)

    def build_module(self):
        module = super().build_module()
        module.guidance_scale = self.args.guidance_scale
        return module

    # ------------------------------------------------------------------------------------------ outputs
    def save_final(self, folder: str):
        kind = self.args.save_weight_dtype
        if kind == "fp32":
            return super().save_final(folder)
        from .. import weights

        whole = weights.full_copy(self.controlnet, self.rt.is_main)  # collective when sharded
        if not self.rt.is_main:
            return []
        if whole is self.controlnet:  # not sharded: the live model, which keeps its fp32 weights
            import copy

            whole = copy.deepcopy(whole)
        whole.to(SAVE_DTYPES[kind]).save_pretrained(folder, variant=kind, safe_serialization=True)
        files = sorted(os.listdir(folder))
        self.training_info(folder, "controlnet", files,
                           load_with=f"{self.controlnet_class}.from_pretrained(this_folder, variant={kind!r})")
        return files

    def summary_extra(self):
        net = getattr(self, "controlnet", None)
        return {"conditioning": getattr(self, "conditioning_source", None),
                "controlnet_layers": [net.config.num_layers, net.config.num_single_layers] if net is not None else None}
