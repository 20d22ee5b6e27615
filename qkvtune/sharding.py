"""FSDP across processes: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) through Trainer/accelerate.

Trainer and accelerate shard the model, run the loop and save and load the optimizer's sharded state. qkvtune
touches sharded parameters itself in three places only, all here:

* ``trainer_arguments``: ``fsdp: true`` as TrainingArguments (FSDP2; each transformer layer a unit, or units of
  at least ``fsdp_min_params`` parameters);
* ``gathered``: the adapter is written from full tensors: every rank gathers each unit's parameters for the
  moment of saving (a collective), rank 0 writes, then every unit is sharded again;
* ``copy_into``: an adapter read from a file is copied into a sharded parameter as this rank's shard (every
  rank reads the file itself, so nothing is communicated).
``broadcast`` makes rank 0's SMT block selection every rank's.
"""

from __future__ import annotations

import contextlib
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def layer_classes(model: torch.nn.Module, modules: list[str]) -> list[str]:
    """The class names of the numbered layers that hold ``modules`` (``model.layers.3.self_attn.q_proj`` →
    the class of ``model.layers.3``): FSDP's units."""
    names = set()
    for path in modules:
        parts = path.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if cut is not None:
            names.add(type(model.get_submodule(".".join(parts[:cut + 1]))).__name__)
    return sorted(names)


def trainer_arguments(fsdp: bool, min_params: int | None, layers: list[str] = ()) -> dict:
    """TrainingArguments keywords for ``fsdp`` (empty when off): FSDP2 with each of the model's layers a unit
    (``layer_classes``; not the model's whole _no_split_modules, which may name an embedding module whose
    embedding accelerate then shards a second time), or units of at least ``min_params`` parameters."""
    if not fsdp:
        return {}
    policy = {"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": min_params} if min_params else \
        {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": list(layers)}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True, **policy}}


def fsdp_on_cpu(accelerator, plugin_args: dict) -> None:
    """accelerate shards with FSDP2 on accelerators only (its CPU processes get DDP), while FSDP2 itself runs on
    CPUs with gloo: give the CPU processes accelerate's same FSDP2 path (its sharding, optimizer state, saving)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"fsdp: accelerate did not enable FSDP for {accelerator.distributed_type}")
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    accelerator.state.distributed_type = DistributedType.FSDP


def _fsdp_modules(model: torch.nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Every FSDP unit's full parameters in place of its shards, for reading (call on every rank)."""
    units = _fsdp_modules(model)
    for m in units:
        m.unshard()
    try:
        yield model
    finally:
        for m in units:
            m.reshard()


def copy_into(p: torch.Tensor, t: torch.Tensor) -> None:
    """p ← t, where p may be a sharded DTensor (then this rank's shard of t is copied)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        t = distribute_tensor(t.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(t.to(p.dtype))


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (unchanged when not distributed)."""
    import torch.distributed as dist

    if world_size() < 2:
        return obj
    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState()  # the process group Trainer will use (accelerate's, as TrainingArguments would start it)
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
