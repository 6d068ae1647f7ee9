"""``OUT.partial/``: the resumable progress of one ``gptqlab quantize`` run.

Resuming. ``OUT.partial/`` holds

- ``run.json``: everything that decides the bytes of the result (settings, the resolved nsamples, seqlen and
  forward batch size, CPU threads per process, device type, dtype and layer-input dtype, gptqlab and torch
  versions, size and mtime of the model's config and weight files, and the SHA-256 of the calibration
  tokens); not the number of torchrun ranks, which does not change the bits;
- ``blocks/block-XXXXX.safetensors``: the packed tensors of each finished block;
- ``state.safetensors``: the inputs of the next block (the outputs of the last finished one) with, in its
  metadata, that block's number, the reports of the finished Linears, the SHA-256 of every finished block
  file, and a SHA-256 over the state itself (its tensors' bytes, shapes and dtypes and the other metadata).

Checksums. A resumed run checks the state's own checksum and every block file against the SHA-256 recorded
when it was written, so damage on disk (a flipped byte, a truncated file) is refused with a one-line error
instead of being carried into the checkpoint; the assembled checkpoint is checked again, as ``gptqlab
verify`` does, before it is renamed to OUT. Files in ``OUT.partial`` that gptqlab does not write are
ignored (a warning names them) and deleted with the folder. Cost: one SHA-256 pass per block over the block
file and over the state (nsamples x seqlen x hidden_size x 4 bytes, 4.3 GB for LLaMA-7B at 128 x 2048),
at 0.4-2 GB/s; writing the state to disk takes about as long.

Each file is written to ``*.tmp`` and renamed into place, and a block file is written before the state
that points past it, so a run killed at any moment (SIGKILL included) leaves a consistent folder. The block
keyword arguments (masks, rotary embeddings) are recomputed from the first calibration sample on resume.

- Re-running the same command continues after the last finished block; the result is byte-identical to
  an uninterrupted run. ``--resume`` does the same but fails when there is nothing to resume.
- ``--no-resume`` deletes ``OUT.partial`` and starts over.
- A ``OUT.partial`` whose ``run.json`` differs from this run is refused (exit 2) with the differences
  listed, and left untouched.
- Bad input found before any work leaves nothing behind. Bad input found during the run (NaN weights in
  block 30, a Hessian that no dampening fixes) deletes ``OUT.partial``: fixing it changes the model or
  the settings, so the progress could not be resumed. A write error (full disk) keeps ``OUT.partial`` when
  it holds at least one finished block and says how to resume; any other crash or Ctrl-C keeps it too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from gptqlab import __version__
from gptqlab.checkpoint.write import save_atomic, sha256_file, write_json
from gptqlab.errors import GptqlabError, printable
from gptqlab.modelfiles import INDEX_FILE
from gptqlab.quantize.driver import LayerReport

if TYPE_CHECKING:
    from gptqlab.quantize.options import QuantizeOptions

log = logging.getLogger("gptqlab")

# The QuantizeOptions fields that decide the block files; a resumed run must match them (see run.json).
RESUME_SETTINGS = (
    "bits",
    "group_size",
    "act_order",
    "static_groups",
    "sym",
    "method",
    "calib",
    "seed",
    "format",
    "damp_percent",
    "true_sequential",
    "mse",
)


_BLOCK_FILE = re.compile(r"block-(\d{5})\.safetensors")


def state_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over a state's tensors (name, dtype, shape and bytes, in name order) and its metadata
    (except the digest itself)."""
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != "state_sha256":
            h.update(f"{key}={meta[key]}\n".encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # a view: no copy of the block's inputs
    return h.hexdigest()


def partial_dir(out: Path) -> Path:
    """Where ``gptqlab quantize`` keeps the progress of a run that writes ``out``."""
    return out.parent / f"{out.name}.partial"


def _model_files(model_dir: Path) -> dict[str, list[int]]:
    """[size, mtime in ns] of the files that define the model: config.json and the weights."""
    files = {}
    for p in sorted(model_dir.iterdir()):
        if p.name in ("config.json", INDEX_FILE) or p.suffix in (".safetensors", ".bin"):
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return files


def run_record(
    opts: QuantizeOptions,
    model_dir: Path,
    input_ids: torch.Tensor,
    device,
    dtype,
    nblocks: int,
    written: str,
    *,
    batch_size: int,
    threads: int | None,
    act_dtype: torch.dtype,
    compute_dtype: torch.dtype | None = None,
) -> dict:
    """What ``run.json`` holds: everything that decides the bytes of the block files (JSON types only).
    input_ids: the calibration tokens [nsamples, seqlen] (their shape gives the resolved nsamples and seqlen);
    dtype: what the block computes in; written: the float type of the unquantized tensors in the checkpoint;
    batch_size: samples per forward batch (the chunks of the Hessian sum); threads: CPU threads per process
    (None off the CPU), which decide how MKL splits sums; act_dtype: how layer inputs are kept between blocks;
    compute_dtype: the dtype of the forward passes' matrix products (None: ``dtype``).
    The number of torchrun ranks is not recorded: it does not change the bits, so a run may resume with another."""
    nsamples, seqlen = input_ids.shape
    record = {
        "gptqlab": __version__,
        "torch": torch.__version__,
        "model": str(model_dir.resolve()),
        "model_files": _model_files(model_dir),
        "blocks": nblocks,
        "settings": {k: getattr(opts, k) for k in RESUME_SETTINGS}
        | {"nsamples": int(nsamples), "seqlen": int(seqlen), "batch_size": batch_size},
        "device": torch.device(device).type,
        "dtype": str(dtype),
        "act_dtype": str(act_dtype),
        "compute_dtype": str(compute_dtype or dtype),
        "threads": threads,
        "written_dtype": written,
        "calibration_sha256": hashlib.sha256(input_ids.contiguous().numpy().tobytes()).hexdigest(),
    }
    return json.loads(json.dumps(record))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            name = f"{prefix}{key}"
            if name.startswith("model_files."):
                out.append(f"model file {name.removeprefix('model_files.')} changed")
            elif name == "calibration_sha256":
                out.append("the calibration tokens differ")
            else:
                out.append(f"{name.removeprefix('settings.')} {a!r} → {b!r}")
    return out


class PartialRun:
    """``OUT.partial``: the progress of one ``gptqlab quantize`` run (the layout is in the module docstring).

    ``finished`` blocks are stored; ``reports`` are their LayerReports; ``inputs`` are block ``finished``'s
    inputs ([hidden [1, seqlen, hidden_size]] * nsamples, on the CPU), or None when no block is finished.
    """

    def __init__(self, out: Path):
        self.folder = partial_dir(out)
        self.blocks = self.folder / "blocks"
        self.run_file = self.folder / "run.json"
        self.state_file = self.folder / "state.safetensors"
        self.finished = 0
        self.reports: list[LayerReport] = []
        self.block_sha256: list[str] = []
        self.inputs: list[torch.Tensor] | None = None

    def block_file(self, i: int) -> Path:
        return self.blocks / f"block-{i:05d}.safetensors"

    def open(self, record: dict, resume: bool | None) -> None:
        """Find the progress of a run with this ``record``, or decide on a fresh start.

        Raises GptqlabError, leaving the folder as it is, when it cannot be resumed. Only ``resume=False``
        changes anything here: it deletes the folder.
        """
        if resume is False:
            shutil.rmtree(self.folder, ignore_errors=True)
        if not self.folder.is_dir() or not any(p.is_file() for p in self.folder.rglob("*")):
            if resume:
                raise GptqlabError(f"--resume: there is no run in progress at {self.folder}")
            return
        redo = "pass --no-resume to delete it and start over"
        for path, folder in ((self.run_file, False), (self.state_file, False), (self.blocks, True)):
            if path.exists() and path.is_dir() != folder:
                kind = "a folder" if folder else "a file"
                raise GptqlabError(f"{path} is in the way: gptqlab keeps {kind} there; {redo}")
        try:
            old = json.loads(self.run_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GptqlabError(f"{self.folder} is not a gptqlab run in progress (no run.json); {redo}") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise GptqlabError(f"{self.run_file} is damaged ({exc}); {redo}") from None
        diffs = _differences(old, record) if isinstance(old, dict) else ["run.json is not an object"]
        if diffs:
            raise GptqlabError(
                f"{self.folder} holds a run with other settings ({'; '.join(diffs)}); rerun with the settings "
                f"it was started with to resume it, or {redo}"
            )
        if self.state_file.is_file():
            self._read_state(record, redo)
        self._warn_strays()
        if self.finished:
            log.info(
                "resuming %s: blocks 0-%d are done, continuing at block %d of %d",
                printable(self.folder),
                self.finished - 1,
                self.finished,
                record["blocks"],
            )

    def _read_state(self, record: dict, redo: str) -> None:
        try:
            with safe_open(str(self.state_file), framework="pt") as h:
                meta = h.metadata() or {}
                tensors = {k: h.get_tensor(k) for k in h.keys()}
            if meta.get("state_sha256") != state_digest(tensors, meta):
                raise ValueError("its checksum does not match its content")
            finished = int(meta["next_block"])
            reports = [LayerReport(**r) for r in json.loads(meta["reports"])]
            hashes = json.loads(meta["blocks_sha256"])
            if not isinstance(hashes, list) or not all(isinstance(x, str) for x in hashes):
                raise ValueError("blocks_sha256 is not a list of digests")
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
            reason = printable(f"{type(exc).__name__}: {exc}")[:200]
            raise GptqlabError(f"{self.state_file} is damaged ({reason}); {redo}") from None
        keys = sorted(tensors)
        inputs = [tensors[k] for k in keys]
        missing = [i for i in range(finished) if not self.block_file(i).is_file()]
        nsamples = record["settings"]["nsamples"]
        well_named = keys == [f"x.{j:05d}" for j in range(len(keys))]
        if missing or not 0 < finished <= record["blocks"] or len(inputs) != nsamples or len(hashes) != finished:
            raise GptqlabError(
                f"{self.state_file} does not match the block files (next block {finished}, {len(inputs)} "
                f"inputs for {nsamples} samples, missing blocks {missing}); {redo}"
            )
        if not well_named:
            raise GptqlabError(f"{self.state_file} is damaged (unexpected tensor names); {redo}")
        for i, digest in enumerate(hashes):
            try:
                actual = sha256_file(self.block_file(i))
            except OSError as exc:
                raise GptqlabError(f"cannot read {self.block_file(i)} ({exc.strerror}); {redo}") from None
            if actual != digest:
                raise GptqlabError(
                    f"{self.block_file(i)} is damaged: its SHA-256 differs from the one recorded when it was "
                    f"written; {redo}"
                )
        self.finished, self.reports, self.block_sha256, self.inputs = finished, reports, hashes, inputs

    def _warn_strays(self) -> None:
        known = {self.run_file, self.state_file}
        known |= {self.block_file(i) for i in range(self.finished)}
        strays = [
            p
            for p in sorted(self.folder.rglob("*"))
            if not p.is_dir()
            and p not in known
            and not p.name.endswith(".tmp")
            and not (p.parent == self.blocks and _BLOCK_FILE.fullmatch(p.name))
            and p != self.blocks / "rest.safetensors"
            and self.folder / "final" not in p.parents
        ]
        if strays:
            names = ", ".join(printable(p.relative_to(self.folder)) for p in strays[:5])
            more = f" and {len(strays) - 5} more" if len(strays) > 5 else ""
            log.warning("%s: ignoring files that gptqlab did not write: %s%s", printable(self.folder), names, more)

    def start(self, record: dict) -> None:
        """Create the folder for a fresh run, or clear what a killed run left beyond its last finished block."""
        if self.run_file.is_file():
            later = [
                p
                for p in self.blocks.glob("block-*.safetensors")
                if (number := _BLOCK_FILE.fullmatch(p.name)) and int(number.group(1)) >= self.finished
            ]
            temporary = [*self.folder.glob("*.tmp"), *self.blocks.glob("*.tmp")]
            for p in [self.folder / "final", self.blocks / "rest.safetensors", *temporary, *later]:
                _remove(p)
            self.blocks.mkdir(exist_ok=True)
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        self.blocks.mkdir(parents=True)
        write_json(self.run_file, record)

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], reports: list[LayerReport], outputs: list) -> None:
        """Store finished block ``i``, then the state that points past it (``outputs``: block i+1's inputs)."""
        save_atomic(tensors, self.block_file(i), metadata={"format": "pt"})
        hashes = [*self.block_sha256[:i], sha256_file(self.block_file(i))]
        reports = self.reports + reports
        state = {f"x.{j:05d}": x.detach().to("cpu").contiguous() for j, x in enumerate(outputs)}
        meta = {
            "next_block": str(i + 1),
            "reports": json.dumps([asdict(r) for r in reports]),
            "blocks_sha256": json.dumps(hashes),
        }
        meta["state_sha256"] = state_digest(state, meta)
        save_atomic(state, self.state_file, metadata=meta)
        self.finished, self.reports, self.block_sha256 = i + 1, reports, hashes

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a file, link or folder that a killed run (or someone else) left where gptqlab writes next."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_error(exc: OSError, run: PartialRun) -> GptqlabError:
    """A one-line message for a failed write, saying how to go on; deletes progress that cannot be resumed."""
    where = exc.filename or run.folder
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "; free disk space or write OUT to another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose an OUT in a folder you can write"
    if run.finished:
        return GptqlabError(
            f"cannot write {where}: {exc.strerror or exc}{hint}; {run.finished} finished blocks are kept in "
            f"{run.folder}: rerun the same command to resume"
        )
    run.discard()
    return GptqlabError(f"cannot write {where}: {exc.strerror or exc}{hint}")
