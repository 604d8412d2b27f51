"""Everything that touches `torch.distributed`: process group, FSDP2/DDP wrapping, reductions, full state dicts.

Order of wrapping (torchtitan style): each backbone layer is `fully_shard`-ed, then the root. On GPU the FSDP2
policy computes in bf16 with fp32 master parameters and fp32 gradient reduction; under DDP the recipe autocasts.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str, timeout_minutes: int) -> DistInfo:
    """Join the torchrun process group (or run single-process); NCCL falls back to gloo without CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        chosen = backend if cuda else "gloo"
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def wrap_draft(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Wrap the draft for data parallelism; a single process gets the bare module."""
    if info.world_size == 1:
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return fully_shard_draft(model, info.device)


def fully_shard_draft(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over the initialized process group: each backbone layer, then the root (any world size, even 1)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in cast(nn.ModuleList, model.layers):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def grad_sync(model: nn.Module, enabled: bool, defer_fsdp: bool):
    """Skip gradient reduction on all but the last micro-batch (DDP `no_sync`, FSDP2 deferred sync)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    set_requires_gradient_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2 modules only
    if defer_fsdp and set_requires_gradient_sync is not None:
        set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_norm(total_norm: torch.Tensor) -> torch.Tensor:
    """A grad norm from `clip_grad_norm_` as a plain tensor (FSDP2 returns a DTensor)."""
    return total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Consolidated (model, optimizer) state on rank 0 (other ranks get empty dicts); works bare, DDP, FSDP2."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options())


def full_model_state(model: nn.Module) -> dict:
    """Consolidated model state on rank 0 only (every rank must call it)."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load consolidated state (read by every rank) into its (possibly sharded) model and optimizer."""
    if not dist.is_initialized():
        model.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True),
    )


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
