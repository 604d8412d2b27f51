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

import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import nemo_automodel_dspark.distributed as D
from nemo_automodel_dspark.model.config import DSparkConfig
from nemo_automodel_dspark.model.drafter import DSparkDrafter, init_weight_and_bias

SKIP_CHUNK = 1 << 22  # elements per scratch chunk when a draw is only advanced past (16 MiB of fp32)


def _on_cpu(value):
    """A meta tensor's CPU stand-in (same size, strides, dtype; uninitialised) or a meta device's CPU one."""
    if isinstance(value, Tensor) and value.is_meta:
        return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="cpu")
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    return value


def _on_meta(tree) -> bool:
    """Whether an op's arguments name the meta device (a meta tensor, or `device=meta` for a factory)."""
    return any(
        (isinstance(v, Tensor) and v.is_meta) or (isinstance(v, torch.device) and v.type == "meta")
        for v in tree_flatten(tree)[0]
    )


def _advance(count: int, chunk: int = SKIP_CHUNK) -> None:
    """Take `count` 32-bit draws from the CPU generator, `chunk` at a time (fp32 `uniform_` takes one per element)."""
    scratch = torch.empty(min(count, chunk), dtype=torch.float32, device="cpu")
    while count > 0:
        scratch[: min(count, chunk)].uniform_()
        count -= chunk


def _draws(func, tensor: Tensor) -> int | None:
    """How many 32-bit draws `func` takes on the CPU for this (meta) fp32 tensor, when that is known, else None.

    `uniform_` takes one per element; `normal_` on a contiguous fp32 tensor of 16 or more elements takes one per
    element plus 16 more when the size is not a multiple of 16 (its last 16 values are redrawn).
    """
    if not (isinstance(tensor, Tensor) and tensor.is_meta and tensor.dtype == torch.float32):
        return None
    if func is torch.ops.aten.uniform_.default:
        return tensor.numel()
    if func is torch.ops.aten.normal_.default and tensor.is_contiguous() and tensor.numel() >= 16:
        return tensor.numel() + (16 if tensor.numel() % 16 else 0)
    return None


@functools.cache
def advancing_is_exact() -> bool:
    """Whether `_advance` leaves the generator where the real draws would (checked once, on small tensors)."""
    saved = torch.get_rng_state()
    try:
        for numel in (16, 17, 100, 1003):
            for draw in (lambda t: t.uniform_(-2.0, 2.0), lambda t: t.normal_(0.0, 0.02)):
                torch.default_generator.manual_seed(0)  # the CPU generator only
                draw(torch.empty(numel, device="cpu"))
                real = torch.get_rng_state()
                torch.default_generator.manual_seed(0)  # the CPU generator only
                count = _draws(*_probe(draw, numel))
                if count is None:
                    return False
                _advance(count, chunk=7)
                if not torch.equal(real, torch.get_rng_state()):
                    return False
        return True
    finally:
        torch.set_rng_state(saved)


def _probe(draw, numel: int):
    """The aten op `draw` dispatches to, with a meta tensor of `numel` elements."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    tensor = torch.empty(numel, device="meta")
    with Record():
        draw(tensor)
    return seen[0], tensor


class CpuDraws(TorchDispatchMode):
    """Every seeded random op on meta tensors takes the same draws from the CPU generator, and drops the values (an
    op on real tensors just runs).

    `uniform_` / `normal_` on fp32 only advance the generator by their known count, in 16 MiB chunks; any other
    seeded op runs on a full CPU scratch tensor of the same shape.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and _on_meta((args, kwargs)):  # a real tensor: runs once
            count = _draws(func, args[0]) if args and advancing_is_exact() else None
            if count is not None:
                _advance(count)
            else:
                cpu_args, cpu_kwargs = tree_map(_on_cpu, (args, kwargs))
                func(*cpu_args, **cpu_kwargs)
        return func(*args, **kwargs)


def meta_draft(target_config, dspark: DSparkConfig) -> DSparkDrafter:
    """The draft's modules on the meta device, the CPU generator advanced as the eager constructor's modules do."""
    advancing_is_exact()  # checked once, outside the meta device context
    with torch.device("meta"), CpuDraws():
        return DSparkDrafter(target_config, dspark, init_weights=False)


def _apply_order(module: nn.Module) -> Iterator[nn.Module]:
    """Modules in the order `nn.Module.apply` visits them (children first)."""
    for child in module.children():
        yield from _apply_order(child)
    yield module


def _own_tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def _meta_like(own: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) as meta tensors of the full shapes."""
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in own.items()}
    return meta["weight"], meta.get("bias")


def _draw_initial(module: nn.Module, own: dict[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU initial values of a Linear/Embedding's own tensors, drawn as `DSparkDrafter._init_weights` does."""
    full = {name: torch.empty(t.shape, dtype=t.dtype, device="cpu") for name, t in own.items()}
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
        if isinstance(module, nn.Linear | nn.Embedding) and any(id(t) in shared for t in own.values()):
            with CpuDraws():  # the draws happen (and are dropped): the target's values replace them
                init_weight_and_bias(*_meta_like(own))
            for tensor in own.values():
                D.copy_full_into(tensor, shared[id(tensor)])
        elif isinstance(module, nn.Linear | nn.Embedding):
            for name, value in _draw_initial(module, own).items():
                D.copy_full_into(own[name], value)
        elif callable(reset := getattr(module, "reset_parameters", None)):
            reset()  # deterministic values; works on sharded (DTensor) parameters too
        else:
            raise TypeError(
                f"{type(module).__name__} holds {sorted(own)} but has no reset_parameters(): the draft cannot be "
                "built on the meta device"
            )
