"""Reading the quantization config of a GPTQ checkpoint, in every variant the ecosystem writes.

Readers look in ``quantize_config.json``, then ``quant_config.json``, then ``config.json`` →
``quantization_config`` (docs/FORMAT.md). Key spellings differ between writers: ``checkpoint_format``
(AutoGPTQ, GPTQModel) or ``format`` (optimum); ``sym`` may be missing (meaning True); legacy AutoGPTQ files
carry ``is_marlin_format`` and ``model_file_base_name``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gptqlab.errors import CheckpointError
from gptqlab.quant.config import CHECKPOINT_FORMATS, SUPPORTED_BITS

CONFIG_FILES = ("quantize_config.json", "quant_config.json")


@dataclass(frozen=True)
class CheckpointQuantConfig:
    """What a loader needs from a checkpoint's config, normalised. ``source`` names the file it came from."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    source: str

    @property
    def zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path}: JSON nested too deeply to decode") from exc
    except ValueError as exc:  # Python's limit on the digits of an integer
        raise CheckpointError(f"{path}: holds an integer too long to convert") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def find_quant_config(folder: str | Path) -> tuple[dict, Path] | None:
    """The raw quantization dict and the file it came from, or None for an unquantized model."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            return _read_json(path), path
    return hf_quant_config(folder)


def hf_quant_config(folder: str | Path) -> tuple[dict, Path] | None:
    """``config.json`` → ``quantization_config`` (what transformers reads) and its path, or None."""
    path = Path(folder) / "config.json"
    if path.is_file():
        qc = _read_json(path).get("quantization_config")
        if qc is not None:
            if not isinstance(qc, dict):
                raise CheckpointError(f"{path}: quantization_config must be an object")
            return qc, path
    return None


def parse_quant_config(raw: dict, source: str) -> CheckpointQuantConfig:
    """Validate and normalise a raw quantization dict; raises CheckpointError naming the key."""
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method is {method!r}; gptqlab reads GPTQ checkpoints only")
    if raw.get("is_marlin_format"):
        raise CheckpointError(f"{source}: Marlin-repacked weights (is_marlin_format: true) are not the GPTQ layout")
    bits = raw.get("bits")
    if type(bits) is not int or bits not in SUPPORTED_BITS:  # 4.0 == 4, but bits must be an integer
        raise CheckpointError(f"{source}: bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
    group_size = raw.get("group_size", -1)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"{source}: group_size must be -1 or a positive integer, got {group_size!r}")
    fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{source}: checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")
    flags = {}
    for key, default in (("desc_act", False), ("sym", True)):
        value = raw.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise CheckpointError(f"{source}: {key} must be true or false, got {value!r}")
        flags[key] = value
    return CheckpointQuantConfig(bits, group_size, flags["desc_act"], flags["sym"], fmt, source)


def read_quant_config(folder: str | Path) -> CheckpointQuantConfig | None:
    found = find_quant_config(folder)
    if found is None:
        return None
    raw, path = found
    return parse_quant_config(raw, str(path))
