"""Load the frozen target FSDP2-sharded without a full copy per rank (`recipe_args.shard_dense_target`).

Every rank builds the target on the meta device and shards it (per decoder layer, decoder, root). Rank 0 alone
reads the weights, streaming: one model tensor at a time from the memory-mapped safetensors files
(`target.checkpoint_reader`), broadcast, each rank keeping only its shard — so rank 0 never holds more than its
shards and one tensor. Non-persistent buffers (RoPE frequencies) are computed on every rank by transformers' own
initialisation. A checkpoint layout the reader does not know falls back to rank 0 loading the whole target with
`from_pretrained` (said in one line); the other ranks still hold only their shards.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import nn

from nemo_automodel_dspark import distributed as D
from nemo_automodel_dspark.model.families import family_for
from nemo_automodel_dspark.target.checkpoint_reader import CheckpointReader, Source, plan_sources
from nemo_automodel_dspark.target.loading import load_target, target_skeleton


def checkpoint_folder(path: str) -> str | None:
    """The local folder of the target's safetensors: `path` itself, or the Hub cache's snapshot (None if neither)."""
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
    except Exception:  # noqa: BLE001 - any Hub failure means: let from_pretrained find (and report) it
        return None


def _streaming_plan(model: nn.Module, path: str) -> tuple[CheckpointReader | None, dict[str, Source] | str]:
    """Rank 0: (the open reader, every tensor's source) or (None, why the checkpoint cannot be streamed)."""
    folder = checkpoint_folder(path)
    if folder is None:
        return None, f"{path} is not a local folder and not in the Hub cache"
    reader = CheckpointReader(folder)
    if not reader.files:
        return None, f"{folder} has no *.safetensors file"
    sources = plan_sources(model, reader)
    if isinstance(sources, str):
        reader.close()
        return None, sources
    return reader, sources


def _buffers_only(module: nn.Module) -> nn.Module:
    """A shallow twin of `module` whose parameters and persistent buffers are meta tensors (initialising them draws
    nothing and writes nothing) and whose non-persistent buffers are the module's own tensors."""
    twin = copy.copy(module)

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    params = {n: None if p is None else nn.Parameter(meta(p), False) for n, p in module._parameters.items()}
    keep = module._non_persistent_buffers_set
    buffers = {n: b if n in keep or b is None else meta(b) for n, b in module._buffers.items()}
    object.__setattr__(twin, "_parameters", params)
    object.__setattr__(twin, "_buffers", buffers)
    object.__setattr__(twin, "_modules", {})
    return twin


def init_non_persistent_buffers(model: nn.Module) -> None:
    """Compute the buffers a checkpoint does not store (RoPE `inv_freq`, Gemma's `embed_scale`) on this rank with
    transformers' own `_init_weights`, as `from_pretrained` does after building on the meta device.

    Each module holding such buffers is initialised by its nearest `PreTrainedModel` (composite models dispatch per
    sub-model), through a twin whose weights are meta tensors: no loaded weight is touched and nothing is drawn.
    """
    from transformers import PreTrainedModel

    def visit(module: nn.Module, owner: PreTrainedModel | None) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        if owner is not None and any(module._buffers.get(n) is not None for n in module._non_persistent_buffers_set):
            with torch.no_grad():
                owner._init_weights(_buffers_only(module))
        for child in module.children():
            visit(child, owner)

    visit(model, None)


def load_sharded_target(
    path: str,
    *,
    dtype: torch.dtype,
    info: D.DistInfo,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """The frozen target sharded over the process group, in `dtype`, on `info.device`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = target_skeleton(config, dtype)
    reader, sources = _streaming_plan(model, path) if info.is_main else (None, {})  # before sharding: ties
    parts = family_for(config).decoder_parts(model)
    D.shard_frozen_target(model, parts.layers, parts.base_model)
    reason = D.broadcast_object(sources if isinstance(sources, str) else None)
    if reason is None:
        assert isinstance(sources, dict)
        names = D.broadcast_object(list(sources))  # rank 0's plan: every rank walks the same tensors
        D.load_from_rank0(model, (lambda name: sources[name]()) if reader is not None else None, info.device, names)
        init_non_persistent_buffers(model)
        if reader is not None:
            reader.close()
        return model
    whole = None
    if info.is_main:
        log(f"target weights: not streamed ({reason}); rank 0 loads the whole target with from_pretrained")
        whole = load_target(path, dtype=dtype, device=torch.device("cpu"), trust_remote_code=trust_remote_code)
    full = {**whole.state_dict(), **dict(whole.named_buffers())} if whole is not None else {}
    names = list({**model.state_dict(), **dict(model.named_buffers())})
    D.load_from_rank0(model, (lambda name: full[name]) if whole is not None else None, info.device, names)
    return model
