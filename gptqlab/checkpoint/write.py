"""Writing a finished checkpoint folder, atomically.

Everything is written into a hidden temporary folder next to OUT and renamed to OUT at the very end, so a
crash never leaves a folder that looks like a finished checkpoint. Tensors are streamed into shards of at
most ``max_shard_bytes``; a SHA-256 manifest (``SHA256SUMS``, the format of ``sha256sum``) covers every
file, so ``sha256sum -c SHA256SUMS`` and ``gptqlab verify`` can check the folder later.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from gptqlab.errors import GptqlabError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST = "SHA256SUMS"
_OS_ERROR = re.compile(r"os error (\d+)")


def temp_dir_for(out: Path) -> Path:
    """The hidden staging folder for OUT, in the same directory so the final rename is atomic."""
    return out.parent / f".{out.name}.tmp"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, except that a failed write (a full disk) raises OSError with its errno
    and the path, as Python's own file functions do; safetensors reports it as a SafetensorError."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` holds either its old content or the complete new one, even
    if the process is killed or the disk fills: write ``path.tmp``, flush it to disk, rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_tensors(tensors, tmp, metadata)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # already renamed after success; a failed write leaves no partial file


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> list[str]:
    """Stream (name, tensor) pairs into safetensors shards; returns the file names written.

    One shard is named ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with an index
    ``model.safetensors.index.json`` mapping every tensor to its shard.
    """
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    temp_names: list[str] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"shard-{len(temp_names):05d}.tmp"
            save_tensors(current, folder / name, metadata={"format": "pt"})
            temp_names.append(name)
            shards.append({k: None for k in current})
        current, size = {}, 0

    total = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if not temp_names:
        raise GptqlabError("no tensors to save")
    if len(temp_names) == 1:
        os.replace(folder / temp_names[0], folder / SINGLE_FILE)
        return [SINGLE_FILE]
    n = len(temp_names)
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for tmp, fin, keys in zip(temp_names, final, shards, strict=True):
        os.replace(folder / tmp, folder / fin)
        weight_map.update({k: fin for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*final, INDEX_FILE]


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(folder: Path) -> Path:
    """SHA-256 of every file in ``folder`` (sorted, recursive), in ``sha256sum`` format."""
    lines = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            lines.append(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}")
    path = folder / MANIFEST
    path.write_text("\n".join(lines) + "\n")
    return path


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished staging folder to ``out``. An existing ``out`` is replaced only with ``overwrite``,
    and only after the new checkpoint is complete."""
    if out.exists():
        if not overwrite:
            raise GptqlabError(f"output {out} already exists; pass --overwrite to replace it")
        trash = out.parent / f".{out.name}.old"
        if trash.exists():
            shutil.rmtree(trash)  # an older copy left aside by a killed run; OUT itself is still in place
        os.replace(out, trash)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(trash, out)  # the old checkpoint goes back where it was
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
