"""Model skeletons without weights, filled lazily from safetensors shards.

The layer-wise driver builds the model on the ``meta`` device (parameters take no memory, buffers such
as rotary frequencies are real), then loads the parameters of one decoder block at a time from the
memory-mapped shards. Peak memory is one block plus the embeddings, whatever the number of layers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gptqlab.errors import CheckpointError


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create every nn.Parameter on the meta device; buffers are still created for real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class SafetensorsWeights:
    """Name → tensor access to a checkpoint folder's safetensors files, through mmap.

    Accepts ``model.safetensors``, a sharded ``model.safetensors.index.json``, or any ``*.safetensors``
    files in the folder. Names are matched exactly, then with the model's base prefix added or removed
    (BLOOM checkpoints store ``h.0...`` for the module ``transformer.h.0...``).
    """

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder = Path(folder)
        self.prefix = prefix
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors weights found")
        self._where: dict[str, str] = {}
        self._handles = {}
        for f in files:
            path = self.folder / f
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc
            self._handles[f] = handle
            for k in handle.keys():
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def _resolve(self, name: str) -> str | None:
        if name in self._where:
            return name
        if self.prefix:
            stripped = name.removeprefix(self.prefix + ".")
            if stripped in self._where:
                return stripped
            if f"{self.prefix}.{name}" in self._where:
                return f"{self.prefix}.{name}"
        return None

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.folder / self._where[key]}: tensor {key!r} cannot be read ({exc})") from exc


def materialize(module: nn.Module, prefix: str, weights: SafetensorsWeights, device, dtype) -> None:
    """Load every meta parameter of ``module`` (named ``prefix.<name>`` in the checkpoint) onto ``device``.

    Floating-point tensors are cast to ``dtype``. Non-finite values raise CheckpointError naming the tensor.
    """
    for name, param in list(module.named_parameters(recurse=True)):
        if param.device.type != "meta":
            continue
        full = f"{prefix}.{name}" if prefix else name
        t = weights.get(full)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(
                f"tensor {full!r} has shape {tuple(t.shape)}, the config expects {tuple(param.shape)}"
            )
        if t.is_floating_point():
            if not torch.isfinite(t).all():
                raise CheckpointError(f"tensor {full!r} contains NaN or Inf; the checkpoint is damaged")
            t = t.to(dtype)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(t.to(device), requires_grad=False)


def release(module: nn.Module) -> None:
    """Return a module's parameters to the meta device, freeing their memory."""
    for owner in module.modules():
        for leaf, p in list(owner._parameters.items()):
            if p is not None:
                owner._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)


class TorchBinWeights:
    """Name → tensor access to ``pytorch_model*.bin`` files, read with ``torch.load(weights_only=True)``
    so that nothing in the file is unpickled as code. Loads the whole state dict (no mmap)."""

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder = Path(folder)
        self.prefix = prefix
        files = sorted(self.folder.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors or pytorch_model*.bin weights found")
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises several unrelated types for a bad pickle
                raise CheckpointError(f"{f}: cannot be read safely as weights ({type(exc).__name__}: {exc})") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(state).__name__}")
            self._tensors.update(state)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def _resolve(self, name: str) -> str | None:
        for key in (name, name.removeprefix(self.prefix + "."), f"{self.prefix}.{name}"):
            if key in self._tensors:
                return key
        return None

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self._tensors[key]


def open_weights(folder: str | Path, prefix: str = "") -> SafetensorsWeights | TorchBinWeights:
    """Safetensors when the folder has them, else ``.bin`` files through the safe loader."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return SafetensorsWeights(folder, prefix)
    return TorchBinWeights(folder, prefix)
