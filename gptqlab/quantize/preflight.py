"""Checks a ``gptqlab quantize`` run makes before any heavy work: that OUT never is, contains or lies inside
an input (model folder, calibration files; symlinks resolved), that its name and folder can be written,
that every Linear of every block can be packed with the chosen settings, and that the tokenizer fits the
model's embedding. Each failure is one :class:`~gptqlab.errors.GptqlabError` line, raised before anything
is written."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptqlab.checkpoint.write import temp_dir_for
from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.quant.pack import codes_per_run
from gptqlab.quantize.lock import lock_path
from gptqlab.quantize.progress import partial_dir

if TYPE_CHECKING:
    from gptqlab.quantize.options import QuantizeOptions


def output_path(text: str) -> Path:
    """OUT as a path, refused when no folder can be made under that name."""
    if "\0" in text:
        raise GptqlabError(f"output {text!r} contains a NUL character; choose another OUT")
    out = Path(text).expanduser()
    if out.name in ("", ".", ".."):
        raise GptqlabError(f"output {text!r} does not name a folder; give OUT as a new folder's path")
    return out


def written_paths(out: Path) -> list[Path]:
    """Everything a run that writes ``out`` creates, moves or deletes."""
    old = out.parent / f".{out.name}.old"  # where publish() moves a checkpoint that --overwrite replaces
    return [out, partial_dir(out), temp_dir_for(out), old, lock_path(out)]


def input_paths(model_dir: Path, calib: str) -> list[tuple[str, Path]]:
    """(what, path) of the run's local inputs: the model folder and the calibration files or folders."""
    from gptqlab.calib import parse_spec

    inputs = [("the model folder", model_dir)]
    for source in parse_spec(calib):
        if source.path is not None and Path(source.path).expanduser().exists():
            inputs.append((f"calibration source {source.label}", Path(source.path).expanduser()))
    return inputs


def check_inputs_untouched(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an OUT whose writing could touch an input: every path the run writes is compared with every
    input after resolving symlinks, whether or not --overwrite is given."""
    for written in written_paths(out):
        w = Path(os.path.realpath(written))
        for what, path in inputs:
            i = Path(os.path.realpath(path))
            if w == i:
                relation = "is"
            elif w in i.parents:
                relation = "contains"
            elif i in w.parents:
                relation = "lies inside"
            else:
                continue
            name = "OUT" if written == out else "gptqlab's work path"
            raise GptqlabError(
                f"{name} {written} {relation} {what} ({path}); gptqlab never writes into or over its inputs: "
                "choose an OUT elsewhere"
            )


def check_out(out: Path, overwrite: bool) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = max(len(os.fsencode(p.name)) for p in written_paths(out))
    if longest > name_max:
        raise GptqlabError(
            f"output name {out.name!r} is too long: gptqlab also writes {partial_dir(out).name!r} beside it, and "
            f"file names here hold at most {name_max} bytes; choose a shorter OUT"
        )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise GptqlabError(f"output {out} already exists; pass --overwrite to replace it")
    if not parent.exists():
        raise GptqlabError(f"cannot create output {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise GptqlabError(f"cannot create output {out}: {parent} is a file, not a folder")
    partial = partial_dir(out)
    if partial.is_symlink():
        raise GptqlabError(f"{partial} is a symbolic link; gptqlab keeps its progress in a real folder: remove it")
    if partial.exists() and not partial.is_dir():
        raise GptqlabError(f"{partial} is in the way: it is a file, but gptqlab keeps its progress there; move it")
    # os.access says yes to root even on a read-only mount, so try for real.
    try:
        Path(tempfile.mkdtemp(prefix=".gptqlab-probe-", dir=parent)).rmdir()  # a short name: see the check above
    except OSError as exc:
        raise GptqlabError(
            f"cannot create output {out}: folder {parent} is not writable ({exc.strerror}); choose another OUT"
        ) from None


def probe_name(out: Path) -> None:
    """Create and remove OUT.partial, so that a name the filesystem refuses (bad characters) fails now."""
    partial = partial_dir(out)
    if partial.exists():
        return
    try:
        partial.mkdir()
        partial.rmdir()
    except OSError as exc:
        hint = "choose another OUT" if exc.errno != errno.EEXIST else "another run is starting there"
        raise GptqlabError(f"cannot create {partial}: {exc.strerror}; {hint}") from None


def check_packable(blocks, arch, opts: QuantizeOptions) -> None:
    """Every Linear of every block fits the group size and the bit width's packing, before any block runs."""
    per_run = codes_per_run(opts.bits)
    for i, block in enumerate(blocks):
        for n in arch.linears:
            lin = block.get_submodule(n)
            name = f"{arch.blocks}.{i}.{n}"
            try:
                opts.quant.group_size_for(lin.in_features)
            except ConfigError as exc:
                raise ConfigError(f"layer {name}: {exc}") from exc
            if lin.in_features % per_run or lin.out_features % per_run:
                raise ConfigError(
                    f"layer {name} has {lin.in_features} inputs and {lin.out_features} outputs, but {opts.bits}-bit "
                    f"packing needs both to be multiples of {per_run}; choose other --bits"
                )


def check_vocab(tokenizer, model, input_ids: torch.Tensor | None = None) -> None:
    """The tokenizer's ids fit the input embedding (an extended vocabulary needs its resized embedding).

    Before calibration the tokenizer's base vocabulary is compared (added special tokens beyond the embedding
    are common and harmless while they do not occur); with ``input_ids``, the ids actually drawn."""
    rows = model.get_input_embeddings().weight.shape[0]
    size = getattr(tokenizer, "vocab_size", None)
    mismatch = (
        "the tokenizer does not belong to this model (an extended vocabulary needs the model whose embedding "
        "was resized for it)"
    )
    if isinstance(size, int) and size > rows:
        raise GptqlabError(f"the tokenizer has {size} tokens, but the model's embedding has {rows} rows: {mismatch}")
    if input_ids is not None and input_ids.numel() and int(input_ids.max()) >= rows:
        raise GptqlabError(
            f"the calibration text has token id {int(input_ids.max())}, but the model's embedding has {rows} rows: "
            f"{mismatch}"
        )
