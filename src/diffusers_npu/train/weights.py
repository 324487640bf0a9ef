"""Model weights in and out of diffusers format, whatever engine holds them.

Under DDP, ZeRO-2 (or one process) every rank holds whole tensors: the main process writes. Under FSDP2 every
parameter is a ``DTensor`` sharded on dim 0; under DeepSpeed ZeRO-3 a parameter is a size-0 placeholder whose
partition lives in ``param.ds_tensor``. For both, nothing here gathers the whole model on one rank:

* :func:`save_pretrained` writes diffusers' *sharded* layout (``diffusion_pytorch_model-0000r-of-0000W``
  files plus ``diffusion_pytorch_model.safetensors.index.json``): each tensor belongs to the rank that owns the
  fewest bytes so far (:func:`_owners`);
  the tensors are gathered one at a time (FSDP: ``DTensor.full_tensor``; ZeRO-3: DeepSpeed's public
  ``deepspeed.zero.GatheredParameters`` on that one parameter), so a rank holds its own tensors plus at most
  one more, and each rank writes the tensors it owns. ``from_pretrained`` reads the result like any sharded
  checkpoint.
* :func:`load_pretrained` reads a single-file or sharded diffusers folder tensor by tensor and copies each
  rank's own slice (``torch.chunk`` along dim 0, FSDP2's sharding) into the local shard (ZeRO-3: rank 0
  writes the gathered parameter and DeepSpeed re-partitions it).
* :func:`save_model` / :func:`save_pipeline` write the final output. A sharded trained model is written in
  the sharded layout above (each rank its own tensors, no rank holds the whole model); only with
  ``consolidated`` (``--save_consolidated``) is it gathered by :func:`full_copy`, one tensor at a time, onto the
  main process, which then holds one whole copy of the trained model on its CPU and writes single files.

All functions must be called on EVERY rank when the model is sharded (they contain collectives).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Optional, Tuple

import torch

from ..errors import CheckpointError

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".index.json"


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_tensor")  # DeepSpeed ZeRO-3 partitioned parameter


def is_sharded(module: torch.nn.Module) -> bool:
    return any(_is_dtensor(p) or _is_zero3(p) for p in module.parameters())


def zero3_params(module: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """State-dict name -> ZeRO-3 parameter (whose state-dict entry is an empty placeholder)."""
    return {n: p for n, p in module.named_parameters() if _is_zero3(p)}


def whole(name: str, t: torch.Tensor, zero3: Dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """The whole value of state entry ``name`` (collective when sharded: every rank calls it, same order)."""
    if _is_dtensor(t):
        return t.full_tensor()
    p = zero3.get(name)
    if p is None:
        return t
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.detach().clone()


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call this)."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def gathered_state_dict(module: torch.nn.Module, only: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Whole tensors on the CPU of every rank (collective under FSDP). For small state (LoRA adapters,
    embedding rows); use :func:`save_pretrained` for whole models."""
    keep = set(only) if only is not None else None
    zero3 = zero3_params(module)
    out = {}
    for name, t in module.state_dict().items():
        if keep is not None and name not in keep:
            continue
        out[name] = whole(name, t, zero3).detach().cpu().clone()
    return out


def _dedupe(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): keep the first of each storage."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.contiguous()
    return out


def save_state_dict(sd: Dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> str:
    from safetensors.torch import save_file

    save_file(_dedupe({k: v.detach().cpu() for k, v in sd.items()}), path, metadata=metadata)
    return path


def weights_name_for(model) -> str:
    """diffusers models keep ``diffusion_pytorch_model.safetensors``, transformers models ``model.safetensors``."""
    return SAFE_WEIGHTS if hasattr(model, "save_config") else "model.safetensors"


def _save_config(model, folder: str) -> None:
    if hasattr(model, "save_config"):
        model.save_config(folder)  # diffusers ModelMixin
    else:
        model.config.save_pretrained(folder)  # transformers PreTrainedModel


def save_pretrained(model, folder: str, is_main: bool, state: Optional[Dict[str, torch.Tensor]] = None,
                    weights_name: Optional[str] = None) -> None:
    """Write ``model`` (or ``state``, a state dict with the model's keys, e.g. EMA weights) as a diffusers /
    transformers model folder. Collective when sharded; otherwise only the main process writes."""
    weights_name = weights_name or weights_name_for(model)
    sd = state if state is not None else model.state_dict()
    zero3 = zero3_params(model) if state is None else {}
    sharded = bool(zero3) or any(_is_dtensor(v) for v in sd.values())
    if not sharded:
        if is_main and state is None and not hasattr(model, "save_config"):
            model.save_pretrained(folder, safe_serialization=True)  # transformers: its own key layout
        elif is_main:
            os.makedirs(folder, exist_ok=True)
            _save_config(model, folder)
            save_state_dict(sd, os.path.join(folder, weights_name), metadata={"format": "pt"})
        return
    rank, world = _dist()
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(weights_name)
    files = [f"{stem}-{r + 1:05d}-of-{world:05d}{ext}" for r in range(world)]
    owners = _owners(sd, zero3, world)
    mine, weight_map, total = {}, {}, 0
    for name, t in sd.items():
        value = whole(name, t, zero3)  # collective: every rank, every tensor, same order
        owner = owners[name]
        weight_map[name] = files[owner]
        total += value.numel() * value.element_size()
        if owner == rank:
            mine[name] = value.detach().cpu() if _fresh(value, t) else value.detach().cpu().clone()
        del value
    save_state_dict(mine, os.path.join(folder, files[rank]), metadata={"format": "pt"})
    if is_main:
        _save_config(model, folder)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(folder, weights_name + INDEX_SUFFIX), "w") as f:
            json.dump(index, f, indent=1)


def _fresh(value: torch.Tensor, held: torch.Tensor) -> bool:
    """``value`` (a gathered tensor) has storage of its own, exactly its size: keep it rather than copy it (a
    copy would briefly hold the tensor twice)."""
    storage = value.untyped_storage()
    return (storage.data_ptr() != local_tensor(held).untyped_storage().data_ptr()
            and storage.nbytes() == value.numel() * value.element_size())


def _owners(sd: Dict[str, torch.Tensor], zero3: Dict[str, torch.nn.Parameter], world: int) -> Dict[str, int]:
    """Which rank writes each tensor: largest first, each to the rank with the fewest bytes so far (the same on
    every rank, from the global shapes alone), so the ranks' shares differ by little more than the smallest
    tensors. (Round-robin by position would give one rank every weight and the other every bias.)"""
    sizes = {}
    for name, t in sd.items():
        shape = tuple(zero3[name].ds_shape) if name in zero3 else tuple(t.shape)
        size = t.element_size()
        for d in shape:
            size *= d
        sizes[name] = size
    load, owners = [0] * world, {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: ties keep state-dict order
        r = min(range(world), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += sizes[name]
    return owners


def _weight_files(folder: str, weights_name: str = SAFE_WEIGHTS) -> Tuple[Dict[str, str], bool]:
    """key -> file for a diffusers model folder (single file or sharded with an index)."""
    index = os.path.join(folder, weights_name + INDEX_SUFFIX)
    single = os.path.join(folder, weights_name)
    if os.path.isfile(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(folder, v) for k, v in wm.items()}, True
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}, False
    raise CheckpointError(f"{folder} holds no {weights_name} (nor its sharded index)")


def read_state(folder: str, weights_name: str = SAFE_WEIGHTS) -> Dict[str, torch.Tensor]:
    """Every tensor of a model folder on the CPU, single-file or sharded layout (for checks and tests)."""
    from safetensors.torch import load_file

    files, _ = _weight_files(folder, weights_name)
    out: Dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        out.update(load_file(path))
    return out


def load_pretrained(model: torch.nn.Module, folder: str, target: Optional[Dict[str, torch.Tensor]] = None,
                    weights_name: Optional[str] = None, allow_missing: Iterable[str] = ()) -> None:
    """Copy the weights of a diffusers / transformers model folder into ``model`` (or into ``target``, a dict of
    tensors with the model's keys, e.g. EMA shadows), shard-aware. Names the folder on any mismatch."""
    from safetensors import safe_open

    weights_name = weights_name or weights_name_for(model)
    files, _ = _weight_files(folder, weights_name)
    dest = target if target is not None else model.state_dict()
    zero3 = zero3_params(model) if target is None else {}
    missing = [k for k in dest if k not in files and k not in set(allow_missing)]
    unexpected = [k for k in files if k not in dest]
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not match the model being trained (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}): was it written for another model or task?")
    handles = {}
    try:
        for name, t in dest.items():
            if name not in files:
                continue
            f = handles.get(files[name])
            if f is None:
                f = handles[files[name]] = safe_open(files[name], "pt")
            copy_into(t, f.get_tensor(name), name, folder, zero3.get(name))
    finally:
        handles.clear()


def copy_into(t: torch.Tensor, src: torch.Tensor, name: str, where: str, zero3_param=None) -> None:
    """Copy the whole tensor ``src`` into ``t`` (this rank's dim-0 chunk when ``t`` is a shard; a ZeRO-3
    parameter through DeepSpeed's gather and re-partition: collective)."""
    if zero3_param is not None:
        import deepspeed

        p = zero3_param
        if tuple(src.shape) != tuple(p.ds_shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(src.shape)} but the model being trained "
                                  f"has {tuple(p.ds_shape)}: was it written for another model?")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if _dist()[0] == 0:
                with torch.no_grad():
                    p.data.copy_(src.to(p.dtype))
        return
    if tuple(src.shape) != tuple(t.shape):
        raise CheckpointError(f"{where}: tensor {name} has shape {tuple(src.shape)} but the model being trained has "
                              f"{tuple(t.shape)}: was it written for another model?")
    local = local_tensor(t)
    if _is_dtensor(t) and local.shape != src.shape:
        rank, world = _dist()
        src = torch.chunk(src, world, dim=0)[rank]
    with torch.no_grad():
        local.copy_(src.to(local.dtype))


def load_state_into(module: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """Copy whole tensors (by state-dict name) into ``module``, shard-aware."""
    dest = module.state_dict()
    zero3 = zero3_params(module)
    unknown = [k for k in state if k not in dest]
    if unknown:
        raise CheckpointError(f"{where}: holds tensors the model being trained does not have ({unknown[:3]})")
    for name, src in state.items():
        copy_into(dest[name], src, name, where, zero3.get(name))


def full_copy(model, is_main: bool):
    """An unsharded copy of ``model`` on the CPU of the main process (None elsewhere); collective under FSDP and
    ZeRO-3 (one tensor gathered at a time). The model itself when it is not sharded."""
    if not is_sharded(model):
        return model
    sd = {}
    zero3 = zero3_params(model)
    for name, t in model.state_dict().items():
        value = whole(name, t, zero3)
        if is_main:
            sd[name] = value.detach().cpu().clone()
        del value
    if not is_main:
        return None
    cls = plain_class(model)
    copy = cls.from_config(model.config) if hasattr(cls, "from_config") else cls(model.config)
    copy.load_state_dict(sd)
    return copy


def plain_class(model) -> type:
    """The model's own diffusers / transformers class (fully_shard swaps it for a generated FSDP subclass)."""
    cls = next((c for c in type(model).__mro__ if not c.__name__.startswith("FSDP")
                and (hasattr(c, "from_config") or hasattr(c, "config_class"))), None)
    if cls is None:
        raise TypeError(f"cannot tell the model class of {type(model).__name__}")
    return cls


def save_model(model, folder: str, is_main: bool, consolidated: bool = False) -> None:
    """A final model folder that ``from_pretrained`` reads. Sharded (FSDP / ZeRO-3): every rank writes the tensors
    it owns (:func:`save_pretrained`), unless ``consolidated``: then gathered onto the main process, single files.
    Collective when sharded: every rank calls it."""
    if is_sharded(model) and not consolidated:
        save_pretrained(model, folder, is_main)
        return
    whole_model = full_copy(model, is_main)
    if is_main:
        whole_model.save_pretrained(folder, safe_serialization=True)


def save_pipeline(folder: str, is_main: bool, build, trained: Dict[str, Optional[torch.nn.Module]],
                  consolidated: bool = False) -> None:
    """The final pipeline folder. ``build(**components)`` makes the pipeline on the main process from the trained
    modules ``trained`` (name -> module) and whatever else it loads itself. A sharded trained module is left out
    of the pipeline's own save, written by every rank in the sharded layout, and named in ``model_index.json``;
    with ``consolidated`` it is gathered onto the main process instead. Collective: every rank calls it."""
    sharded = {} if consolidated else {n: m for n, m in trained.items() if m is not None and is_sharded(m)}
    whole_models = {n: (full_copy(m, is_main) if m is not None else None)
                    for n, m in trained.items() if n not in sharded}  # collective for sharded ones
    if is_main:
        pipe = build(**whole_models, **{n: None for n in sharded})
        if sharded:
            pipe.register_modules(**{n: None for n in sharded})  # written below, by every rank
        pipe.save_pretrained(folder, safe_serialization=True)
        if sharded:
            path = os.path.join(folder, "model_index.json")
            with open(path) as f:
                index = json.load(f)
            for n, m in sharded.items():
                cls = plain_class(m)
                index[n] = [cls.__module__.split(".")[0], cls.__name__]
            with open(path + ".tmp", "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)
    for n, m in sharded.items():
        save_pretrained(m, os.path.join(folder, n), is_main)
