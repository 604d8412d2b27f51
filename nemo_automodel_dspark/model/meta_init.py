"""Build the draft on the meta device, shard it, then give each rank its shard of the usual initial weights.

An eager build (`DSparkDrafter(...)` on the CPU) draws its weights from the CPU generator twice: the modules'
own constructors (`nn.Linear`'s kaiming, `nn.Embedding`'s normal), then the draft's N(0, 0.02) pass over every
Linear and Embedding. A meta build allocates nothing and draws nothing, so it replays both, one tensor at a time:

1. `meta_draft`: while the modules are built on the meta device, every seeded random op is also run on a CPU
   scratch tensor of the same shape and dtype and thrown away (`CpuDraws`), so the generator advances exactly as
   the eager constructor left it — modules a constructor builds and drops included.
2. `materialize_draft` (after the caller has wrapped the meta draft, e.g. `fully_shard`): `to_empty`, then in the
   order `nn.Module.apply` visits them, each Linear/Embedding's full initial tensor is drawn on the CPU and every
   rank keeps its own slice; other modules' tensors come from their `reset_parameters()` (RMSNorm scales, RoPE
   frequencies, Gemma4's `layer_scalar`). The frozen `embed_tokens` / `lm_head` then take the target's values.

Gathered, the result equals the eager draft bit for bit for the same seed, and the generator ends in the same
state (tests/model/test_meta_init.py). No rank ever holds more than its shards plus one full tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import nemo_automodel_dspark.distributed as D
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter, init_weight_and_bias


def _on_cpu(value):
    """A meta tensor's CPU stand-in (same size, strides, dtype; uninitialised) or a meta device's CPU one."""
    if isinstance(value, Tensor) and value.is_meta:
        return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="cpu")
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    return value


class CpuDraws(TorchDispatchMode):
    """Every seeded random op on meta tensors is also run on CPU scratch tensors: the same draws, results dropped."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            cpu_args, cpu_kwargs = tree_map(_on_cpu, (args, kwargs))
            func(*cpu_args, **cpu_kwargs)
        return func(*args, **kwargs)


def meta_draft(target_config, dspark: DSparkConfig) -> DSparkDrafter:
    """The draft's modules on the meta device, the CPU generator advanced as the eager constructor's modules do."""
    with torch.device("meta"), CpuDraws():
        return DSparkDrafter(target_config, dspark, init_weights=False)


def _apply_order(module: nn.Module) -> Iterator[nn.Module]:
    """Modules in the order `nn.Module.apply` visits them (children first)."""
    for child in module.children():
        yield from _apply_order(child)
    yield module


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def _draw_initial(module: nn.Module, own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU initial values of a Linear/Embedding's own tensors, drawn as `DSparkDrafter._init_weights` does."""
    full = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in own.items()}
    init_weight_and_bias(full["weight"], full.get("bias"))
    return full


def materialize_draft(draft: DSparkDrafter, device: torch.device, embed: Tensor, lm_head: Tensor) -> None:
    """Allocate a meta-built (possibly sharded) draft on `device` and fill it as an eager build would be filled.

    `embed` / `lm_head` are the target's full [V, H] weights, copied into the draft's frozen copies (their draws
    still happen, and are dropped, so that every later tensor gets the eager build's values).
    """
    draft.to_empty(device=device)
    shared = {id(draft.embed_tokens.weight): embed, id(draft.lm_head.weight): lm_head}
    for module in _apply_order(draft):
        own = _own_tensors(module)
        if not own:
            continue
        if isinstance(module, nn.Linear | nn.Embedding):
            for name, value in _draw_initial(module, own).items():
                D.copy_full_into(own[name], shared.get(id(own[name]), value))
        elif callable(reset := getattr(module, "reset_parameters", None)):
            reset()  # deterministic values; works on sharded (DTensor) parameters too
        else:
            raise TypeError(
                f"{type(module).__name__} holds {sorted(own)} but has no reset_parameters(): the draft cannot be "
                "built on the meta device"
            )
