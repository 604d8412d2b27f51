"""Read a target's safetensors checkpoint one model tensor at a time, without building the model on the host.

`plan_sources` maps every tensor of a (meta-device, not yet sharded) target's state dict onto the checkpoint: the
same name, a weight tied to one that is stored, or — for MoE layers whose transformers module fuses the experts
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) — the per-expert tensors the hub
stores (`mlp.experts.{e}.gate_proj.weight`, ...), stacked as transformers' own conversion does. A layout it does
not know returns the reason instead, and the caller falls back to `from_pretrained`. Files are memory-mapped:
reading one tensor copies only that tensor into private memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

Source = Callable[[], Tensor]  # produces one model tensor, whole, on the host
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<name>gate_up_proj|down_proj)$")


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files: those `model.safetensors.index.json` names when there is one (as transformers reads them,
    ignoring stray copies such as `consolidated.safetensors`), else every `*.safetensors` file of the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


class CheckpointReader:
    """The tensors of a folder's `*.safetensors` files (single file or shards), by name, opened lazily."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.files = checkpoint_files(Path(folder))
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}
        self.shapes: dict[str, list[int]] = {}
        for file in self.files:
            handle = self._stack.enter_context(safe_open(str(file), "pt"))
            names = handle.keys()  # a safe_open handle is not iterable
            for key in names:
                self._where[key] = handle
                self.shapes[key] = list(handle.get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._stack.close()


def _experts(reader: CheckpointReader, prefix: str, name: str, count: int) -> Source | None:
    """The fused expert tensor from per-expert ones: gate_up = [stack(gate) | stack(up)] along dim 1; down = stack."""
    parts = ("gate_proj", "up_proj") if name == "gate_up_proj" else ("down_proj",)
    keys = [[f"{prefix}.{e}.{part}.weight" for e in range(count)] for part in parts]
    if not all(key in reader.shapes for group in keys for key in group):
        return None

    def read() -> Tensor:
        stacked = [torch.stack([reader.get(key) for key in group]) for group in keys]
        return torch.cat(stacked, dim=1) if len(stacked) > 1 else stacked[0]

    return read


def _source(reader: CheckpointReader, key: str, shape: list[int]) -> Source | None:
    if key in reader.shapes:
        return (lambda: reader.get(key)) if reader.shapes[key] == shape else None
    fused = _FUSED_EXPERTS.match(key)
    if fused and len(shape) == 3:
        return _experts(reader, fused["prefix"], fused["name"], shape[0])
    return None


def plan_sources(model: nn.Module, reader: CheckpointReader) -> dict[str, Source] | str:
    """Every state-dict tensor of `model` → how to read it whole; or why that is not possible.

    Pass the model before it is sharded (meta is fine): tied tensors (the same parameter under two names, e.g.
    Gemma4's `lm_head.weight`) are recognised there and both names read the one the checkpoint stores.
    """
    tensors = model.state_dict(keep_vars=True)
    found: dict[int, Source] = {}
    for key, tensor in tensors.items():
        source = _source(reader, key, list(tensor.shape))
        if source is not None:
            found.setdefault(id(tensor), source)
    missing = [key for key, tensor in tensors.items() if id(tensor) not in found]
    if missing:
        return f"the checkpoint has no tensor (or none of the model's shape) for {missing[0]}"
    return {key: found[id(tensor)] for key, tensor in tensors.items()}
