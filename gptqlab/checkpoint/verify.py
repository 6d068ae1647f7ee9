"""``gptqlab verify``: is a GPTQ checkpoint folder sound?

Every check reports :class:`Problem` objects that name the file (relative to the folder) and, where there
is one, the tensor. The checks:

1. Integrity (:func:`check_manifest`, reads every byte): each file listed in ``SHA256SUMS`` exists and
   has that SHA-256; weight, config and code files the manifest does not list are problems too.
2. Config (:func:`check_config`): the quantization config parses (:mod:`gptqlab.checkpoint.config`), and when both
   ``quantize_config.json`` and ``config.json`` → ``quantization_config`` exist they agree (gptqlab reads
   the first, transformers the second).
3. Tensors against the config and the architecture (:func:`check_tensors`; headers, plus the values of
   the small tensors; ``qweight`` data is never read):

   - every Linear that the architecture quantizes (:mod:`gptqlab.arch`) is stored packed in every block;
   - each quantized Linear (K inputs, N outputs, G = ceil(K / group_size) groups; FORMAT.md) has
     ``qweight`` int32 [K·bits/32, N], ``qzeros`` int32 [G, N·bits/32], ``scales`` float [G, N], and
     optionally ``g_idx`` integer [K] and ``bias`` float [N];
   - values: scales finite and positive, bias finite, g_idx in [0, G) and equal to k // group_size
     without act-order. Codes and zero points cannot leave their range, because a ``bits``-wide field
     holds 0 … 2^bits - 1 whatever its content; what can be wrong is the zero point's meaning: with
     ``sym`` every zero point must be exactly 2^(bits-1);
   - every other parameter of the model is stored with its shape, a float dtype and finite values.

:func:`ensure_sound` runs 2 and 3 and raises CheckpointError; ``gptqlab.load`` calls it on every load.
``gptqlab verify`` runs all three; it exits 0 when the folder is sound, 1 when it is not (one problem per
line), and 2 for a usage error (no such folder, custom code not allowed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from gptqlab.checkpoint.config import (
    CONFIG_FILES,
    CheckpointQuantConfig,
    find_quant_config,
    hf_quant_config,
    parse_quant_config,
)
from gptqlab.checkpoint.write import MANIFEST, sha256_file
from gptqlab.errors import CheckpointError, GptqlabError
from gptqlab.modelfiles import (
    INDEX_FILE,
    model_config,
    model_skeleton,
    open_safetensors,
    open_weights,
    safetensors_files,
)
from gptqlab.quant.config import SUPPORTED_BITS
from gptqlab.quant.pack import unpack_cols

_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_MANIFESTED_SUFFIXES = (".safetensors", ".bin", ".json", ".py")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_QUANT_FIELDS = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: ``file`` relative to its folder, ``tensor`` ("" for a whole file)."""

    file: str
    tensor: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.tensor}: {self.message}" if self.tensor else f"{self.file}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``problems`` (empty when sound), files hashed, quantized Linears checked."""

    folder: Path
    problems: list[Problem] = field(default_factory=list)
    hashed: int = 0
    layers: int = 0

    @property
    def sound(self) -> bool:
        return not self.problems


def _from_error(exc: GptqlabError, folder: Path, default_file: str) -> Problem:
    """A Problem from an error whose message starts with a path inside ``folder``."""
    text = str(exc)
    head = f"{folder}/"
    if text.startswith(head):
        file, sep, message = text[len(head) :].partition(": ")
        if sep:
            return Problem(file, "", message)
    return Problem(default_file, "", text)


def check_manifest(folder: Path) -> tuple[list[Problem], int]:
    """Compare every file with ``SHA256SUMS``; returns the problems and the number of files that matched."""
    path = folder / MANIFEST
    if not path.is_file():
        return [
            Problem(
                MANIFEST,
                "",
                "missing, so file integrity cannot be checked (checkpoints from other tools have none; "
                "pass --no-hashes to check everything else)",
            )
        ], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(MANIFEST, "", f"cannot be read ({exc})")], 0
    problems, listed, hashed = [], set(), 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line)
        if match is None:
            problems.append(Problem(MANIFEST, "", f"line {number} is not '<sha256>  <file>'"))
            continue
        digest, name = match.groups()
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            problems.append(Problem(MANIFEST, "", f"line {number} names {name!r}, which is outside the folder"))
            continue
        listed.add(rel.as_posix())
        target = folder / rel
        if not target.is_file():
            problems.append(Problem(name, "", "listed in SHA256SUMS but missing"))
            continue
        try:
            actual = sha256_file(target)
        except OSError as exc:
            problems.append(Problem(name, "", f"cannot be read ({exc.strerror})"))
            continue
        if actual != digest.lower():
            problems.append(Problem(name, "", "SHA-256 differs from SHA256SUMS: the file was changed or damaged"))
        else:
            hashed += 1
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.suffix in _MANIFESTED_SUFFIXES and rel not in listed:
            problems.append(Problem(rel, "", "not listed in SHA256SUMS, so its integrity cannot be checked"))
    return problems, hashed


def check_config(folder: Path) -> tuple[CheckpointQuantConfig | None, list[Problem]]:
    """The checkpoint's quantization config (None when it has none or it is unusable) and its problems."""
    try:
        found = find_quant_config(folder)
    except CheckpointError as exc:
        return None, [_from_error(exc, folder, "config.json")]
    if found is None:
        return None, [
            Problem(
                "config.json",
                "",
                f"no quantization config: none of {', '.join(CONFIG_FILES)} exists and config.json has no "
                "quantization_config, so this is not a GPTQ checkpoint",
            )
        ]
    raw, path = found
    try:
        qc = parse_quant_config(raw, path.name)
    except CheckpointError as exc:
        return None, [Problem(path.name, "", str(exc).removeprefix(f"{path.name}: "))]
    if path.name == "config.json":
        return qc, []
    try:
        found_hf = hf_quant_config(folder)
    except CheckpointError as exc:
        return qc, [_from_error(exc, folder, "config.json")]
    try:
        hf = None if found_hf is None else parse_quant_config(found_hf[0], "config.json")
    except CheckpointError as exc:
        return qc, [Problem("config.json", "", f"quantization_config: {str(exc).removeprefix('config.json: ')}")]
    differ = [k for k in _QUANT_FIELDS if hf is not None and getattr(hf, k) != getattr(qc, k)]
    if not differ:
        return qc, []
    theirs = ", ".join(f"{k}={getattr(hf, k)!r}" for k in differ)
    ours = ", ".join(f"{k}={getattr(qc, k)!r}" for k in differ)
    return qc, [
        Problem(
            "config.json",
            "",
            f"quantization_config says {theirs} but {path.name} says {ours}; transformers reads the first, "
            "gptqlab and GPTQModel the second",
        )
    ]


def _default_file(weights) -> str:
    if len(weights.files) == 1:
        return weights.files[0]
    return INDEX_FILE if (weights.folder / INDEX_FILE).is_file() else "*.safetensors"


def required_linears(model: nn.Module) -> list[str]:
    """Names of the Linears that the architecture quantizes, in every block; [] for an unknown architecture."""
    from gptqlab.arch import arch_for, block_list

    try:
        arch = arch_for(model)
        blocks = block_list(model, arch)
    except GptqlabError:
        return []
    return [f"{arch.blocks}.{i}.{n}" for i in range(len(blocks)) for n in arch.linears]


def _check_linear(name: str, lin: nn.Linear, weights, qc: CheckpointQuantConfig) -> list[Problem]:
    """Shapes, dtypes and values of one quantized Linear's tensors (FORMAT.md)."""
    k, n, bits = lin.in_features, lin.out_features, qc.bits
    problems: list[Problem] = []

    def problem(tensor: str, message: str) -> None:
        full = f"{name}.{tensor}"
        problems.append(Problem(weights.file_of(full) or _default_file(weights), full, message))

    per_run = 32 if bits == 3 else 32 // bits
    if k % per_run or n % per_run:
        problem("qweight", f"{bits}-bit packing needs in_features ({k}) and out_features ({n}) divisible by {per_run}")
        return problems
    gs = k if qc.group_size == -1 else qc.group_size
    g = math.ceil(k / gs)
    layout = f"bits={bits}, group_size={qc.group_size}, in_features={k}, out_features={n}"
    expected = {
        "qweight": ((k * bits // 32, n), (torch.int32,), "int32"),
        "qzeros": ((g, n * bits // 32), (torch.int32,), "int32"),
        "scales": ((g, n), _FLOATS, "a float dtype"),
        "g_idx": ((k,), _INTS, "an integer dtype"),
        "bias": ((n,), _FLOATS, "a float dtype"),
    }
    for tensor, (shape, dtypes, dtype_name) in expected.items():
        full = f"{name}.{tensor}"
        if full not in weights:
            if tensor in ("qweight", "qzeros", "scales"):
                problem(tensor, "missing")
            continue
        got, dtype = weights.info(full)
        if dtype not in dtypes:
            problem(tensor, f"dtype {dtype}, expected {dtype_name}")
        elif got != shape:
            hint = ""
            if tensor == "qweight" and len(got) == 2 and got[1] == n and (got[0] * 32) % k == 0:
                fits = got[0] * 32 // k
                if fits in SUPPORTED_BITS and fits != bits:
                    hint = f"; the rows fit bits={fits}: is bits in the config wrong?"
            problem(tensor, f"shape {list(got)}, expected {list(shape)} for {layout}{hint}")
    if problems:
        return problems

    scales = weights.get(f"{name}.scales").float()  # [G, N]
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bad.any():
        problem("scales", f"{int(bad.sum())} of {bad.numel()} scales are not finite and positive")
    zeros = unpack_cols(weights.get(f"{name}.qzeros"), bits).to(torch.int64) + qc.zero_offset  # [G, N]
    if qc.sym and bool((zeros != 2 ** (bits - 1)).any()):
        wrong = int((zeros != 2 ** (bits - 1)).sum())
        problem(
            "qzeros",
            f"{wrong} of {zeros.numel()} zero points differ from {2 ** (bits - 1)}, the only zero of sym {bits}-bit "
            f"(checkpoint_format {qc.checkpoint_format!r} stores it as {2 ** (bits - 1) - qc.zero_offset})",
        )
    if f"{name}.g_idx" in weights:
        g_idx = weights.get(f"{name}.g_idx").to(torch.int64)  # [K]
        if bool(((g_idx < 0) | (g_idx >= g)).any()):
            problem("g_idx", f"group indices must lie in [0, {g}), found {int(g_idx.min())} … {int(g_idx.max())}")
        elif not qc.desc_act and not torch.equal(g_idx, torch.arange(k) // gs):
            problem("g_idx", "not k // group_size, but the config says desc_act is false")
    if f"{name}.bias" in weights and not torch.isfinite(weights.get(f"{name}.bias")).all():
        problem("bias", "contains NaN or Inf")
    return problems


def _check_plain(model: nn.Module, weights, quantized: set[str]) -> list[Problem]:
    """Every parameter outside the Linears in ``quantized``: present, float, the right shape, finite."""
    problems = []
    out_emb = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for pname, param in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if owner in quantized:
            continue
        if pname not in weights:
            if not (tied and out_emb is not None and param is out_emb.weight):
                problems.append(Problem(_default_file(weights), pname, "missing"))
            continue
        file = weights.file_of(pname)
        shape, dtype = weights.info(pname)
        if dtype not in _FLOATS:
            problems.append(Problem(file, pname, f"dtype {dtype}, expected a float dtype"))
        elif shape != tuple(param.shape):
            problems.append(Problem(file, pname, f"shape {list(shape)}, the config expects {list(param.shape)}"))
        elif not torch.isfinite(weights.get(pname)).all():
            problems.append(Problem(file, pname, "contains NaN or Inf"))
    return problems


def check_tensors(model: nn.Module, weights, qc: CheckpointQuantConfig) -> list[Problem]:
    """The tensor checks (3 in the module docstring) for a meta-device ``model`` built from the folder's
    config, its opened ``weights`` (:func:`gptqlab.modelfiles.open_weights`) and its quantization config."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    required = required_linears(model)
    problems = [
        Problem(
            _default_file(weights), f"{n}.qweight", "missing: the architecture quantizes this Linear in every block"
        )
        for n in required
        if f"{n}.qweight" not in weights
    ]
    quantized = {n for n in linears if f"{n}.qweight" in weights}
    for name in sorted(quantized):
        problems += _check_linear(name, linears[name], weights, qc)
    return problems + _check_plain(model, weights, quantized | set(required))


def ensure_sound(folder: Path, model: nn.Module, weights, qc: CheckpointQuantConfig) -> None:
    """Run the config and tensor checks; raise CheckpointError naming the first problem (and how many more)."""
    problems = check_config(folder)[1] + check_tensors(model, weights, qc)
    if problems:
        more = f" (and {len(problems) - 1} more; run gptqlab verify {folder})" if len(problems) > 1 else ""
        raise CheckpointError(f"{folder}/{problems[0]}{more}")


def _open_weights(folder: Path, prefix: str, model=None):
    """The folder's weights, or None and one problem per unreadable file."""
    if any(folder.glob("*.safetensors")) or (folder / INDEX_FILE).is_file():
        try:
            files = safetensors_files(folder)
        except CheckpointError as exc:
            return None, [_from_error(exc, folder, INDEX_FILE)]
        problems = []
        for f in files:
            try:
                open_safetensors(folder / f)
            except CheckpointError as exc:
                problems.append(_from_error(exc, folder, f))
        if problems:
            return None, problems
    try:
        return open_weights(folder, prefix, model=model), []
    except CheckpointError as exc:
        return None, [_from_error(exc, folder, ".")]


def verify(folder: str | Path, hashes: bool = True, trust_remote_code: bool = False) -> VerifyReport:
    """Check a checkpoint folder (see the module docstring). Raises GptqlabError only for a usage error: no
    such folder, or a model whose custom code ``trust_remote_code`` does not allow."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptqlabError(f"{folder} is not a folder; give a checkpoint folder")
    report = VerifyReport(folder)
    if hashes:
        problems, report.hashed = check_manifest(folder)
        report.problems += problems
    qc, problems = check_config(folder)
    report.problems += problems
    if qc is None:
        return report
    try:
        config = model_config(folder, trust_remote_code)
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # a plain skeleton; the quantized layers are checked here
        model = model_skeleton(config, trust_remote_code)
    except CheckpointError as exc:
        report.problems.append(_from_error(exc, folder, "config.json"))
        return report
    weights, problems = _open_weights(folder, model.base_model_prefix, model)
    report.problems += problems
    if weights is not None:
        try:
            report.problems += check_tensors(model, weights, qc)
        except CheckpointError as exc:  # a tensor whose header is fine but whose data cannot be read
            report.problems.append(_from_error(exc, folder, "."))
        report.layers = sum(
            1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.qweight" in weights
        )
    return report
