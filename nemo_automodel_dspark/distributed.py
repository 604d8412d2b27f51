"""Everything that touches `torch.distributed`: process group, FSDP2/DDP wrapping, reductions, full state dicts.

Order of wrapping (torchtitan style): activation checkpointing of the backbone layers, then each layer is
`fully_shard`-ed, then the root. On GPU the FSDP2 policy computes in bf16 with fp32 master parameters and fp32
gradient reduction; under DDP the recipe autocasts. A frozen target can be sharded too (`shard_frozen_target`):
per decoder layer, the decoder, the root, in its own dtype, forward only; its weights come from rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable
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
    local_world_size: int = 1  # ranks on this node (they share its host memory)

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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, local_world_size=local_world)


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Recompute each layer's forward in backward instead of keeping its activations (non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def wrap_draft(model: nn.Module, strategy: str, info: DistInfo, activation_checkpointing: bool = False) -> nn.Module:
    """Wrap the draft for data parallelism; a single process gets the bare module."""
    if activation_checkpointing:
        checkpoint_layers(cast(nn.ModuleList, model.layers))
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


def shard_frozen_target(target: nn.Module, layers: nn.ModuleList, decoder: nn.Module) -> None:
    """FSDP2 over a frozen target: each decoder layer, the decoder (which capture calls directly), then the root.

    No mixed-precision policy (the target computes in the dtype it was loaded in) and `reshard_after_forward`, so
    between forwards each rank keeps only its 1/world of every weight; there are no gradients or optimizer state.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(decoder, reshard_after_forward=True)
    if decoder is not target:
        fully_shard(target, reshard_after_forward=True)


def load_from_rank0(
    model: nn.Module, read: Callable[[str], torch.Tensor] | None, device: torch.device, names: Iterable[str]
) -> None:
    """Fill a sharded meta-device `model`'s tensors `names` from rank 0, one tensor at a time.

    `read(name)` gives rank 0 the whole tensor (None on the other ranks); it is broadcast and every rank keeps only
    its shard, so a rank holds its shards plus one full tensor at most. `model` is allocated (`to_empty`) first.
    """
    model.to_empty(device=device)
    targets = {**model.state_dict(), **dict(model.named_buffers())}
    for name in names:
        tensor = targets[name]
        if read is not None:
            full = read(name).to(device, tensor.dtype)
        else:
            full = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        dist.broadcast(full, src=0)
        copy_full_into(tensor, full)
        del full


def copy_full_into(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole value `full` into `tensor`: only this rank's slice when it is a sharded DTensor.

    Every rank must pass the same `full` (no communication: each keeps its own slice, by the placement's own
    chunking); a plain tensor takes all of it. Dtype and device are converted as `copy_` does.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(tensor, DTensor):
            full = full.to(tensor.device)
            mine = distribute_tensor(full, tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.to_local().copy_(mine.to_local())
        else:
            tensor.copy_(full)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter, gathered on every rank; plain tensors as they are."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shard of a DTensor, the whole of a plain tensor)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


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
