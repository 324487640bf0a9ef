"""The task contract: what differs between training jobs, behind one small interface.

The :class:`~diffusers_npu.train.loop.Trainer` owns the loop (engine, precision, accumulation, clipping, EMA,
checkpoints, pre-emption, logging, validation). A task says only:

* which models it loads and which of them train: :meth:`Task.build_module` returns ONE ``torch.nn.Module``
  whose ``forward(batch)`` returns ``(loss, metrics)``. It registers the trainable parts as sub-modules
  (UNet, ControlNet, LoRA adapters inside the UNet, the text encoder's input embeddings) and merely refers
  to the frozen ones, so ``accelerator.prepare`` wraps exactly what trains (DDP, FSDP or DeepSpeed);
* what a sample is (:meth:`build_dataset`), and how it may be cached (:meth:`cache_encoders`);
* how the trained parts are written and read back, in the form users load (:meth:`save_trained`,
  :meth:`load_trained`; used by checkpoints and by the final save), and what the final output is
  (:meth:`save_final`);
* how a pipeline is built for validation (:meth:`pipeline`).

Capabilities are typed class attributes, declared once. A task registers itself with
:func:`~diffusers_npu.train.registry.register_task`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional

import torch

from .registry import LaunchProfile


@dataclass
class Runtime:
    """Where and how the task runs; filled in by the Trainer before :meth:`Task.build_module`."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weight_dtype: torch.dtype = torch.float32  # dtype of the frozen models (the autocast dtype)
    rank: int = 0
    world_size: int = 1
    is_main: bool = True
    is_local_main: bool = True
    barrier: Callable[[], None] = lambda: None
    sharded: bool = False  # FSDP / ZeRO-3: trainable parameters are shards
    ledger: Optional[object] = None  # the run's OutputLedger: record finished files (kept on failure)
    preemption: Optional[object] = None  # the run's Preemption: pass .check as a pipeline step callback

    def finished(self, path: str) -> None:
        """Record a file or folder this run finished writing (the failure clean-up never deletes it)."""
        if self.ledger is not None:
            self.ledger.done(final=path)

    def writers_first(self):
        """Run the body on the global main process first, then on each other node's main process, then on the
        rest; everybody leaves together. A body that writes only on ``is_local_main`` and only what is missing
        gives a shared folder one writer (see :func:`diffusers_npu.train.ranks.writers_first`)."""
        from .ranks import writers_first

        return writers_first(self.is_main, self.is_local_main, self.barrier)


class Task(abc.ABC):
    # ---- identity (the registry, the CLI and the launchers read these)
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    example: ClassVar[str] = ""
    launch: ClassVar[Optional[LaunchProfile]] = None
    #: flag defaults of this task that differ from the common ones (upstream's per-script defaults)
    defaults: ClassVar[Dict[str, object]] = {}

    #: the model family this task trains (model_folder.model_family's name, or an object with that ``name``):
    #: a pipeline folder of another family is refused, naming the script to use; None: no check
    family: ClassVar[Optional[object]] = None

    # ---- capabilities
    supports_cache: ClassVar[bool] = False      # --cache_latents
    supports_buckets: ClassVar[bool] = False    # --aspect_ratio_buckets
    supports_ema: ClassVar[bool] = True         # --use_ema
    ema_refusal: ClassVar[str] = ""             # why not, when supports_ema is False
    uses_embedded_data: ClassVar[bool] = True   # no data flags -> the embedded digits
    output_kind: ClassVar[str] = "pipeline"     # pipeline | lora | textual_inversion | controlnet
    default_resolution: ClassVar[int] = 512     # --resolution when a real model is trained

    @classmethod
    def prepare_embedded(cls, progress: bool = False) -> dict:
        """Make (once) the embedded offline model and data set; {'model', 'dataset', 'resolution'}."""
        from .. import embedded

        return {**embedded.prepare(progress=progress), "resolution": embedded.RESOLUTION}

    def __init__(self, args, runtime: Optional[Runtime] = None):
        self.args = args
        self.rt = runtime or Runtime()

    # ---- flags
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add the task's own flags."""

    @classmethod
    def resolve_args(cls, args) -> None:
        """Fill in defaults that depend on the task's own flags (called by ``config.resolve_defaults``)."""

    def validate_args(self) -> None:
        """Check the task's flags against each other; raise UsageError naming the flag."""

    # ---- models and data
    @abc.abstractmethod
    def build_module(self) -> torch.nn.Module:
        """Load the models (on ``self.rt.device``) and return the module to train."""

    @abc.abstractmethod
    def build_dataset(self) -> torch.utils.data.Dataset:
        """The training samples, keyed by ``(epoch, index)`` (or ``(epoch, index, bucket)``)."""

    def cache_encoders(self):
        """For --cache_latents: ``(encode_images, encode_prompts, key_parts)``; see data.cache."""
        raise NotImplementedError

    def attention_models(self) -> List[torch.nn.Module]:
        """Models whose diffusers Attention modules get ``--attention`` (and channels_last on CUDA)."""
        return []

    def checkpointing_models(self) -> List[torch.nn.Module]:
        """Trained models that recompute activations with ``--gradient_checkpointing``."""
        return []

    def compile_models(self) -> List[torch.nn.Module]:
        """Models ``--compile`` compiles."""
        return []

    def release_encoders(self) -> None:
        """After building the latent cache: move the encoders off the device."""

    def after_validation(self) -> None:
        """After validation images: send encoders that had left the device (latent cache) away again."""
        if getattr(self.args, "cache_latents", False):
            self.release_encoders()

    def ema_model(self) -> Optional[torch.nn.Module]:
        """The model --use_ema averages (its trainable parameters)."""
        return None

    def optimizer_groups(self, params: List[torch.Tensor]) -> Optional[List[dict]]:
        """Parameter groups with their own options (``lr``, ``weight_decay``), or None for one group."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step with the new step number (textual inversion restores the frozen
        embedding rows and writes its periodic embedding files)."""

    # ---- outputs
    @abc.abstractmethod
    def save_trained(self, folder: str, ema_state: Optional[dict] = None) -> List[str]:
        """Write the trained parts into ``folder`` in the form users load (diffusers model folders, LoRA or
        embedding files). Called on every rank (collective when sharded). Returns the names written."""

    @abc.abstractmethod
    def load_trained(self, folder: str) -> Optional[dict]:
        """Read back what :meth:`save_trained` wrote (and the layout of older versions). Returns the EMA
        weights it found (name -> tensor) or None."""

    @abc.abstractmethod
    def pipeline(self):
        """A pipeline over the models being trained, for validation images and the learning check."""

    @abc.abstractmethod
    def save_final(self, folder: str) -> List[str]:
        """Write the final output into ``folder`` (main process; models already hold EMA weights if used)."""

    def validation_kwargs(self, index: int, prompt: str) -> dict:
        """Extra pipeline arguments for validation prompt ``index`` (a ControlNet's conditioning image)."""
        return {}

    def summary_extra(self) -> dict:
        return {}
