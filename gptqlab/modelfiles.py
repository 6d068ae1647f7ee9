"""Model skeletons without weights, filled lazily from safetensors shards.

The layer-wise driver builds the model on the ``meta`` device (parameters take no memory, buffers such
as rotary frequencies are real), then loads the parameters of one decoder block at a time from the
memory-mapped shards. Peak memory is one block plus the embeddings, whatever the number of layers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gptqlab.errors import CheckpointError, GptqlabError, printable


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


INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# Weight dtypes that gptqlab reads as model parameters: it computes in float32 (CPU) or float16 (CUDA) and
# stores float16, so these convert without surprise. Integer and float8 weights are quantized already (they
# come with scales that a plain cast would ignore) and are refused.
FLOAT_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def require_regular_file(path: str | Path, what: str = "file") -> None:
    """Raise CheckpointError unless ``path`` is a regular file or a folder (symlinks followed); missing paths
    pass, so that the caller's own "no such file" message stays. Reading a FIFO or a device would block or
    never end."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, unreadable or a NUL in the name: the caller's open() says which
        return
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
    raise CheckpointError(f"{printable(path)} is {kind}; gptqlab reads {what}s only from regular files")


def require_regular_files(folder: Path) -> None:
    """Every entry of ``folder`` (not recursive) is a folder or a regular file; see :func:`require_regular_file`."""
    for p in sorted(folder.iterdir()):
        require_regular_file(p, "model file")


def _index_files(index: Path) -> list[str]:
    """The shard names of a ``model.safetensors.index.json``; each must be a .safetensors file beside it."""
    return sorted(set(_index_map(index).values()))


def _index_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name → shard file beside it."""
    require_regular_file(index, "model file")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON, an oversized int
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object mapping tensor names to files")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}, not a .safetensors file in this folder")
    return weight_map


def safetensors_files(folder: Path) -> list[str]:
    """Names of the safetensors files of a checkpoint folder: the shards its index lists, else every
    ``*.safetensors`` file. Raises CheckpointError for a bad index or a folder without weights."""
    index = folder / INDEX_FILE
    files = _index_files(index) if index.is_file() else sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights found")
    return files


def open_safetensors(path: Path):
    """A safetensors handle (mmap; the header is validated against the file size, no data is read)."""
    require_regular_file(path, "weight")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc


class SafetensorsWeights:
    """Name → tensor access to a checkpoint folder's safetensors files, through mmap.

    Accepts ``model.safetensors``, a sharded ``model.safetensors.index.json``, or any ``*.safetensors``
    files in the folder. Names are matched exactly, then with the model's base prefix added or removed
    (BLOOM checkpoints store ``h.0...`` for the module ``transformer.h.0...``).

    A tensor name stored in two files, or an index that maps a tensor to a shard that does not hold it,
    raises CheckpointError: which copy a reader takes would otherwise depend on the reader.
    """

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder = Path(folder)
        self.prefix = prefix
        self.files = safetensors_files(self.folder)
        self._alias: dict[str, str] = {}
        self._where: dict[str, str] = {}
        self._handles = {}
        for f in self.files:
            handle = open_safetensors(self.folder / f)
            self._handles[f] = handle
            for k in handle.keys():
                if k in self._where:
                    raise CheckpointError(
                        f"{self.folder}: tensor {k!r} is stored twice, in {self._where[k]} and in {f}; "
                        "remove one copy (readers disagree on which one counts)"
                    )
                self._where[k] = f
        index = self.folder / INDEX_FILE
        if index.is_file():
            for name, file in _index_map(index).items():
                if self._where.get(name) != file:
                    held = f"it is in {self._where[name]}" if name in self._where else "no shard holds it"
                    raise CheckpointError(f"{index}: maps tensor {name!r} to {file}, but {held}")

    def keys(self) -> list[str]:
        return list(self._where)

    def unmap(self) -> None:
        """Open the files afresh. A tensor read here is a view of the file's memory map, and every page read
        through a handle counts in this process's RSS for as long as the handle lives (a LLaMA-7B layer: 400 MB
        per layer read); the old maps close once no tensor read from them is left."""
        self._handles = {f: open_safetensors(self.folder / f) for f in self.files}

    def _resolve(self, name: str) -> str | None:
        return _resolve(name, self.prefix, self._alias, self._where)

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def file_of(self, name: str) -> str | None:
        """The file (a name inside the folder) that holds tensor ``name``, or None when it is missing."""
        key = self._resolve(name)
        return None if key is None else self._where[key]

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """Shape and dtype of tensor ``name`` from the file header, without reading its data. The dtype is
        None for a safetensors dtype that torch does not have."""
        key = self._resolve(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        view = self._handles[self._where[key]].get_slice(key)
        return tuple(view.get_shape()), SAFETENSORS_DTYPES.get(view.get_dtype())

    def get(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except (SafetensorError, TypeError, ValueError) as exc:  # TypeError: a dtype torch does not have
            raise CheckpointError(f"{self.folder / self._where[key]}: tensor {key!r} cannot be read ({exc})") from exc


def materialize(module: nn.Module, prefix: str, weights: SafetensorsWeights, device, dtype) -> None:
    """Load every meta parameter of ``module`` (named ``prefix.<name>`` in the checkpoint) onto ``device``.

    Floating-point tensors are cast to ``dtype``. Non-finite values raise CheckpointError naming the tensor.
    The files are then mapped afresh (:meth:`SafetensorsWeights.unmap`).
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
    weights.unmap()  # the pages just read stop counting toward RSS once their copies are all that is left


def release(module: nn.Module, skip: str = "") -> None:
    """Return a module's parameters to the meta device, freeing their memory; those of the submodule named
    ``skip`` (e.g. the decoder blocks) are kept. A parameter shared by two modules (a tied head) stays shared."""
    meta: dict[int, nn.Parameter] = {}
    for name, owner in module.named_modules():
        if skip and (name == skip or name.startswith(skip + ".")):
            continue
        for leaf, p in list(owner._parameters.items()):
            if p is not None and p.device.type != "meta":
                owner._parameters[leaf] = meta.setdefault(id(p), nn.Parameter(p.to("meta"), requires_grad=False))


class TorchBinWeights:
    """Name → tensor access to ``pytorch_model*.bin`` files, read with ``torch.load(weights_only=True)``
    so that nothing in the file is unpickled as code. Loads the whole state dict (no mmap)."""

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder = Path(folder)
        self.prefix = prefix
        files = sorted(self.folder.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors or pytorch_model*.bin weights found")
        self.files = [f.name for f in files]
        self._alias: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._where: dict[str, str] = {}
        for f in files:
            require_regular_file(f, "weight")
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises several unrelated types for a bad pickle
                raise CheckpointError(
                    f"{f}: cannot be read safely as weights ({type(exc).__name__}: {_unpickling_reason(exc)}); "
                    "only plain tensors are loaded from .bin files: get a safetensors copy of the model"
                ) from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{f}: expected a state dict, found {type(state).__name__}")
            for key, value in state.items():
                if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{f}: entry {key!r} is {type(value).__name__}, not a named tensor")
                if key in self._where:
                    raise CheckpointError(
                        f"{self.folder}: tensor {key!r} is stored twice, in {self._where[key]} and in {f.name}; "
                        "remove one copy (readers disagree on which one counts)"
                    )
                self._tensors[key] = value
                self._where[key] = f.name

    def keys(self) -> list[str]:
        return list(self._tensors)

    def unmap(self) -> None:
        """Nothing to do: these tensors are loaded whole, not mapped."""

    def file_of(self, name: str) -> str | None:
        key = self._resolve(name)
        return None if key is None else self._where[key]

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        t = self.get(name)
        return tuple(t.shape), t.dtype

    def _resolve(self, name: str) -> str | None:
        return _resolve(name, self.prefix, self._alias, self._tensors)

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str) -> torch.Tensor:
        key = self._resolve(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        return self._tensors[key]


def _resolve(name: str, prefix: str, alias: dict[str, str], stored) -> str | None:
    """The stored key for module tensor ``name``: renamed (see :func:`transformers_renamer`), as it is, or
    with the model's base prefix removed or added."""
    candidates = [alias.get(name), name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    return next((k for k in candidates if k is not None and k in stored), None)


def transformers_renamer(model: nn.Module) -> Callable[[str], str] | None:
    """The key renaming transformers applies when it loads ``model``'s checkpoints (transformers ≥ 5 keeps
    a table: GPT-NeoX stores ``embed_out`` for the module ``lm_head``, for example), or None without one.
    Only plain renamings are followed; tensors that transformers splits or fuses are not."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4: checkpoints use the module names
        return None
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return None

    def rename(key: str) -> str:
        for t in renamings:
            key, _ = t.rename_source_key(key)
        return key

    return rename


def open_weights(
    folder: str | Path, prefix: str = "", model: nn.Module | None = None
) -> SafetensorsWeights | TorchBinWeights:
    """Safetensors when the folder has them, else ``.bin`` files through the safe loader. With ``model``,
    stored keys that transformers renames on load are also found under the module names."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")) or (folder / INDEX_FILE).is_file():
        weights = SafetensorsWeights(folder, prefix)
    else:
        weights = TorchBinWeights(folder, prefix)
    rename = transformers_renamer(model) if model is not None else None
    if rename is not None:
        for key in weights.keys():
            new = rename(key)
            if new != key:
                weights._alias[new] = key
    return weights


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unpickling_reason(exc: BaseException) -> str:
    """The line of torch's weights-only error that says what was refused; the rest of its message explains
    how to load the file unsafely, which is not advice to pass on."""
    for line in str(exc).splitlines():
        _, found, reason = line.partition("WeightsUnpickler error: ")
        if found:
            return reason.split(". ")[0]
    return _first_line(exc)


def _custom_code_files(folder: Path) -> str:
    """The Python files that a folder's config.json ``auto_map`` would run, for error messages."""
    try:
        auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map", {})
        modules = {ref.split(".")[0] for ref in auto_map.values() if isinstance(ref, str)}
    except (OSError, ValueError, RecursionError, AttributeError):  # AttributeError: a config that is no object
        return "its own Python code"
    return ", ".join(f"{m}.py" for m in sorted(modules)) or "its own Python code"


def model_config(folder: str | Path, trust_remote_code: bool = False):
    """The transformers config of a model folder.

    Raises GptqlabError when the model needs custom code that was not allowed (nothing of it is run), and
    CheckpointError, with the first line of transformers' explanation, when config.json cannot be used.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    require_regular_file(folder / "config.json", "model file")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, KeyError, TypeError and huggingface_hub validation errors
        if "trust_remote_code" in str(exc):
            raise GptqlabError(
                f"model {folder} runs custom code ({_custom_code_files(folder)}); read it, and pass "
                "--trust-remote-code (trust_remote_code=True in Python) if you trust it"
            ) from exc
        raise CheckpointError(f"{folder / 'config.json'}: cannot be used: {_first_line(exc)}") from exc


def model_skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM built from ``config`` with every parameter on the meta device (no memory, no weights read).

    Raises CheckpointError when transformers accepts the config but cannot build a model from it (sizes
    that do not fit together, for instance).
    """
    from transformers import AutoModelForCausalLM

    try:
        with meta_parameters():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # model constructors raise whatever their arithmetic on the config raises
        name = getattr(config, "model_type", "unknown")
        raise CheckpointError(
            f"cannot build a {name!r} model from its config.json: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


# Where decoder blocks are numbered in the tensor names of the supported architectures: ``model.layers.N.``
# (LLaMA, Qwen2), ``h.N.``/``transformer.h.N.`` (BLOOM), ``gpt_neox.layers.N.`` (GPT-NeoX).
_BLOCK_NUMBER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def stored_block_count(keys: Iterable[str]) -> int | None:
    """Number of decoder blocks that tensor names refer to (the largest block number + 1), or None when no
    name has a block number."""
    numbers = {int(m.group(1)) for k in keys if (m := _BLOCK_NUMBER.search(k))}
    return max(numbers) + 1 if numbers else None


def check_layer_count(config, keys: Iterable[str], folder: Path) -> None:
    """Refuse a config that claims another number of decoder blocks than the weights hold, before a skeleton is
    built from it: a skeleton of a million blocks costs memory even with meta parameters."""
    claimed = getattr(config, "num_hidden_layers", None)
    stored = stored_block_count(keys)
    if isinstance(claimed, int) and claimed > 0 and stored is None:
        raise CheckpointError(
            f"{folder / 'config.json'} says the model has {claimed} decoder layers (num_hidden_layers), but no "
            "tensor name in its weights has a layer number (layers.N, h.N or blocks.N)"
        )
    if isinstance(claimed, int) and stored is not None and claimed != stored:
        raise CheckpointError(
            f"{folder / 'config.json'} says the model has {claimed} decoder layers (num_hidden_layers), but its "
            f"weights hold {stored}; the config does not belong to these weights"
        )


def check_parameters(model: nn.Module, weights, tied: Iterable[str] = ()) -> None:
    """Every parameter of a meta-device ``model`` is stored in ``weights`` with its shape and a float dtype
    (:data:`FLOAT_WEIGHT_DTYPES`), judged from the file headers alone. ``tied``: names that may be missing
    because they share another parameter's tensor. Raises CheckpointError naming the first bad tensor."""
    tied = set(tied)
    for name, param in model.named_parameters(remove_duplicate=False):
        if name not in weights:
            if name in tied:
                continue
            raise CheckpointError(f"{weights.folder}: tensor {name!r} is missing from the checkpoint")
        shape, dtype = weights.info(name)
        if shape != tuple(param.shape):
            raise CheckpointError(f"tensor {name!r} has shape {shape}, the config expects {tuple(param.shape)}")
        if dtype not in FLOAT_WEIGHT_DTYPES:
            stored = dtype if dtype is not None else "a dtype torch does not know"
            raise CheckpointError(
                f"tensor {name!r} is stored as {stored}; gptqlab quantizes float16, bfloat16 or float32 weights "
                "(an integer or float8 checkpoint is quantized already: start from its float weights)"
            )
