"""The one validation of a quantized Linear's file tensors (docs/FORMAT.md, "Invariants").

``gptqlab verify`` and :func:`gptqlab.checkpoint.verify.ensure_sound` (so every ``gptqlab.load``) call
:func:`linear_problems` on the opened weights; :func:`check_linear` applies the same rules to tensors in
memory and raises, for ``QuantLinear.from_checkpoint``. No other module states a rule of the format.

Per Linear (K = in_features, N = out_features, G = ceil(K / group_size), group_size -1 meaning K):

- packing: K and N are multiples of :func:`gptqlab.quant.pack.codes_per_run` (32 // bits; 32 for 3 bits);
- present: ``qweight``, ``qzeros``, ``scales``; ``g_idx`` too when ``desc_act`` is true, because without it
  the act-order permutation is lost; ``bias`` is optional;
- dtypes and shapes: ``qweight`` int32 [K·bits/32, N], ``qzeros`` int32 [G, N·bits/32], ``scales`` float [G, N],
  ``g_idx`` integer [K], ``bias`` float [N];
- values: scales finite and positive; bias finite; g_idx in [0, G), and equal to k // group_size when
  ``desc_act`` is false; zero points z (the stored field plus the format's offset) in [0, 2^bits), exactly
  2^(bits-1) when ``sym``. A v1 (``gptq``) file stores z - 1, so a stored all-ones field decodes to
  z = 2^bits, which no code range holds.

``qweight`` codes need no value check: a ``bits``-wide field holds 0 … 2^bits - 1 whatever its content.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from gptqlab.errors import CheckpointError
from gptqlab.kernels.layout import num_groups
from gptqlab.quant.pack import SUPPORTED_BITS, codes_per_run, unpack_cols

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
REQUIRED = ("qweight", "qzeros", "scales")


class TensorSource(Protocol):
    """What the rules read: ``SafetensorsWeights`` (headers without reading data) or :class:`InMemory`."""

    def __contains__(self, name: str) -> bool: ...

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]: ...

    def get(self, name: str) -> torch.Tensor: ...


class InMemory:
    """A :class:`TensorSource` over tensors already in memory, keyed by full name."""

    def __init__(self, tensors: Mapping[str, torch.Tensor | None]):
        self._tensors = {k: v for k, v in tensors.items() if v is not None}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


@dataclass(frozen=True)
class LinearRules:
    """The settings a Linear's tensors are checked against.

    zero_offset: 1 for ``checkpoint_format`` "gptq" (v1, stores z - 1), 0 for "gptq_v2".
    sym / desc_act: None skips the checks that depend on them (a caller that does not know the config).
    """

    bits: int
    group_size: int
    zero_offset: int
    sym: bool | None = None
    desc_act: bool | None = None

    @classmethod
    def of(cls, qc) -> LinearRules:
        """From a :class:`gptqlab.checkpoint.config.CheckpointQuantConfig`."""
        return cls(qc.bits, qc.group_size, qc.zero_offset, qc.sym, qc.desc_act)

    def describe(self, k: int, n: int) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, in_features={k}, out_features={n}"


def _settings_problems(rules: LinearRules, k: int, n: int) -> list[tuple[str, str]]:
    if rules.bits not in SUPPORTED_BITS:
        return [("config", f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {rules.bits}")]
    if rules.zero_offset not in (0, 1):
        return [("config", f"zero_offset must be 1 ('gptq') or 0 ('gptq_v2'), got {rules.zero_offset}")]
    if k <= 0 or n <= 0 or (rules.group_size != -1 and rules.group_size <= 0):
        return [("config", "in_features, out_features and group_size (or -1) must be positive")]
    per_run = codes_per_run(rules.bits)
    if k % per_run or n % per_run:
        return [
            (
                "qweight",
                f"{rules.bits}-bit packing needs in_features ({k}) and out_features ({n}) divisible by {per_run}",
            )
        ]
    return []


def _header_problems(src: TensorSource, prefix: str, rules: LinearRules, k: int, n: int) -> list[tuple[str, str]]:
    bits, g = rules.bits, num_groups(k, rules.group_size)
    expected = {
        "qweight": ((k * bits // 32, n), (torch.int32,), "int32"),
        "qzeros": ((g, n * bits // 32), (torch.int32,), "int32"),
        "scales": ((g, n), FLOATS, "a float dtype"),
        "g_idx": ((k,), INTS, "an integer dtype"),
        "bias": ((n,), FLOATS, "a float dtype"),
    }
    problems = []
    for tensor, (shape, dtypes, dtype_name) in expected.items():
        full = f"{prefix}{tensor}"
        if full not in src:
            if tensor in REQUIRED:
                problems.append((tensor, "missing"))
            elif tensor == "g_idx" and rules.desc_act:
                problems.append((tensor, "missing, but desc_act is true: the act-order permutation would be lost"))
            continue
        got, dtype = src.info(full)
        if dtype not in dtypes:
            problems.append((tensor, f"dtype {dtype}, expected {dtype_name}"))
        elif got != shape:
            hint = ""
            if tensor == "qweight" and len(got) == 2 and got[1] == n and (got[0] * 32) % k == 0:
                fits = got[0] * 32 // k
                if fits in SUPPORTED_BITS and fits != bits:
                    hint = f"; the rows fit bits={fits}: is bits in the config wrong?"
            problems.append((tensor, f"shape {list(got)}, expected {list(shape)} for {rules.describe(k, n)}{hint}"))
    return problems


def _zero_problems(zeros: torch.Tensor, rules: LinearRules) -> list[tuple[str, str]]:
    """zeros: [G, N] int64, the actual zero points (offset added)."""
    bits, offset = rules.bits, rules.zero_offset
    fmt = "'gptq'" if offset else "'gptq_v2'"
    if rules.sym:
        mid = 2 ** (bits - 1)
        wrong = int((zeros != mid).sum())
        if wrong:
            return [
                (
                    "qzeros",
                    f"{wrong} of {zeros.numel()} zero points differ from {mid}, the only zero of sym {bits}-bit "
                    f"(checkpoint_format {fmt} stores it as {mid - offset})",
                )
            ]
        return []
    outside = int((zeros >= 2**bits).sum())  # only a v1 file can decode past the range: stored 2^bits - 1, plus 1
    if outside:
        return [
            (
                "qzeros",
                f"{outside} of {zeros.numel()} zero points decode to {2**bits}, outside 0 … {2**bits - 1} for "
                f"{bits} bits (checkpoint_format {fmt} stores z - 1, so the stored field {2**bits - 1} is invalid)",
            )
        ]
    return []


def _value_problems(src: TensorSource, prefix: str, rules: LinearRules, k: int) -> list[tuple[str, str]]:
    problems = []
    g = num_groups(k, rules.group_size)
    scales = src.get(f"{prefix}scales").float()  # [G, N]
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bad.any():
        problems.append(("scales", f"{int(bad.sum())} of {bad.numel()} scales are not finite and positive"))
    zeros = unpack_cols(src.get(f"{prefix}qzeros"), rules.bits).to(torch.int64) + rules.zero_offset  # [G, N]
    problems += _zero_problems(zeros, rules)
    if f"{prefix}g_idx" in src:
        g_idx = src.get(f"{prefix}g_idx").to(torch.int64)  # [K]
        if bool(((g_idx < 0) | (g_idx >= g)).any()):
            problems.append(
                ("g_idx", f"group indices must lie in [0, {g}), found {int(g_idx.min())} … {int(g_idx.max())}")
            )
        elif rules.desc_act is False:
            gs = k if rules.group_size == -1 else rules.group_size
            if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // gs):
                problems.append(("g_idx", "not k // group_size, but the config says desc_act is false"))
    if f"{prefix}bias" in src and not torch.isfinite(src.get(f"{prefix}bias")).all():
        problems.append(("bias", "contains NaN or Inf"))
    return problems


def linear_problems(
    src: TensorSource, name: str, in_features: int, out_features: int, rules: LinearRules
) -> list[tuple[str, str]]:
    """Every rule of the module docstring for the Linear ``name`` (tensors ``{name}.qweight`` ...).

    Returns ``(tensor, message)`` pairs, tensor being "qweight", "qzeros", "scales", "g_idx", "bias" or
    "config"; empty when the Linear is sound. Values are read only when shapes and dtypes are right, and
    ``qweight``'s data never.
    """
    prefix = f"{name}." if name else ""
    k, n = in_features, out_features
    problems = _settings_problems(rules, k, n)
    if not problems:
        problems = _header_problems(src, prefix, rules, k, n)
    if not problems:
        problems = _value_problems(src, prefix, rules, k)
    return problems


def check_linear(
    tensors: Mapping[str, torch.Tensor | None],
    rules: LinearRules,
    in_features: int,
    out_features: int,
    name: str = "",
) -> None:
    """:func:`linear_problems` on in-memory tensors keyed "qweight", "qzeros", "scales", "g_idx", "bias"
    (None or absent for an optional one); raises CheckpointError naming the first problem's tensor."""
    src = InMemory(tensors)
    problems = linear_problems(src, "", in_features, out_features, rules)
    if problems:
        tensor, message = problems[0]
        where = f"{name}.{tensor}" if name else tensor
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{where}: {message}{more}")
