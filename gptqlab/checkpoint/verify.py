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
   - each quantized Linear follows the rules of :mod:`gptqlab.checkpoint.validate` (docs/FORMAT.md):
     shapes, dtypes, finite positive scales, zero points in range (the midpoint when ``sym``), ``g_idx``
     present for act-order, in range, and k // group_size without act-order;
   - every other parameter of the model is stored with its shape, a float dtype and finite values.

:func:`ensure_sound` runs 2 and 3 and raises CheckpointError; ``gptqlab.load`` calls it on every load.
``gptqlab verify`` runs all three; it exits 0 when the folder is sound, 1 when it is not (one problem per
line), and 2 for a usage error (no such folder, custom code not allowed).
"""

from __future__ import annotations

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
from gptqlab.checkpoint.validate import FLOATS, LinearRules, linear_problems
from gptqlab.checkpoint.write import MANIFEST, sha256_file
from gptqlab.errors import CheckpointError, GptqlabError, printable
from gptqlab.modelfiles import (
    INDEX_FILE,
    model_config,
    model_skeleton,
    open_safetensors,
    open_weights,
    safetensors_files,
)

_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_MANIFESTED_SUFFIXES = (".safetensors", ".bin", ".json", ".py")
_QUANT_FIELDS = ("bits", "group_size", "desc_act", "sym", "checkpoint_format")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: ``file`` relative to its folder, ``tensor`` ("" for a whole file)."""

    file: str
    tensor: str
    message: str

    def __str__(self) -> str:
        """One line: control characters in names (a file called ``"a\\nb"``) are escaped by
        :func:`gptqlab.errors.printable`, so a name can never forge a second line."""
        text = f"{self.file}: {self.tensor}: {self.message}" if self.tensor else f"{self.file}: {self.message}"
        return printable(text)


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
    """The rules of :mod:`gptqlab.checkpoint.validate` for one quantized Linear, as Problems naming the file."""
    problems = []
    for tensor, message in linear_problems(weights, name, lin.in_features, lin.out_features, LinearRules.of(qc)):
        full = f"{name}.{tensor}"
        problems.append(Problem(weights.file_of(full) or _default_file(weights), full, message))
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
        if dtype not in FLOATS:
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
