"""Model and device resolution: what ``gptqlab.load``, the CLI and the benchmarks share, without the
quantizer."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from gptqlab.errors import ConfigError, GptqlabError


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when torch sees one, else cpu; 'cpu'; 'cuda' or 'cuda:N' (an error without CUDA).
    The one device parser of the CLI, the benchmarks and :func:`gptqlab.load`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device; use cpu")
    if name not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device(name)


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """An embedded model name, a local folder, or a Hub id (downloaded through huggingface_hub).

    A local folder must hold config.json, and every file in it must be a regular file: a FIFO or a device
    among the weights would make a reader block forever."""
    from gptqlab.embedded import resolve_model
    from gptqlab.modelfiles import require_regular_files

    model = os.fspath(model)
    if "\0" in model:
        raise GptqlabError(f"model path {model!r} contains a NUL character")
    resolved = resolve_model(model)
    path = Path(resolved)
    if path.is_dir():
        require_regular_files(path)
        if not (path / "config.json").is_file():
            raise GptqlabError(f"model folder {path} has no config.json")
        return path
    if path.exists():
        raise GptqlabError(f"model path {model} is a file; give the folder that holds config.json and the weights")
    looks_like_path = (os.sep in model and not re.fullmatch(r"[\w.-]+/[\w.-]+", model)) or model.startswith((".", "~"))
    if looks_like_path:
        raise GptqlabError(f"model path {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # network, auth and not-found errors come in many types
        raise GptqlabError(
            f"model {model!r} is not an embedded model, a local folder or a reachable Hub id ({type(exc).__name__})"
        ) from exc


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (None: leave the count as it is), then restore the
    previous count: quantizing and scoring choose their own without changing the caller's."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
