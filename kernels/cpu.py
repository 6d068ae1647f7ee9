"""The CPU path of a GPTQ layer: torch's int4 kernel (``aten._weight_int4pack_mm_for_cpu``) on codes
repacked once at load time, and a tiled dequantize-then-dense-bf16 matmul for many rows.

Why this kernel: it reads 4 bits per weight and dequantizes in registers (AVX-512 on x86), so at one row
of activations it moves a quarter of the bf16 bytes. At LLaMA-7B's 4096x4096, one thread, M = 1, with the
cache flushed before each call, a loaded layer took 1.66 ms against 5.13 ms for a dense fp32 matmul and
12.0 ms for dense bf16 (medians of 40 alternated rounds on the shared 2-core AMX Xeon;
benchmarks/results/cpu-2core/kernels-cpu-7b-w4-decode.json, ``gptqlab bench kernels --device cpu
--shapes 4096x4096 --shrink 1 --bits 4 --batches 1,16 --repeats 40 --threads 1``).

Layout the kernel reads, per layer part (P = 1 part for 2/3/4-bit, 2 parts for 8-bit):

=============  =====================  ==============================================================
tensor         shape / dtype          meaning
=============  =====================  ==============================================================
weight         [P, N, K/2] uint8      ``aten._convert_weight_to_int4pack_for_cpu`` of the [N, K] codes:
                                      columns in blocks of 64 (``BLOCK_N``); inside a block the bytes
                                      form [K, 32] and byte [k, j] holds column j in its low nibble
                                      and column j+32 in its high one. A last block of fewer than 64
                                      columns holds [K, n/2] bytes, columns 2j and 2j+1.
scale_zeros    [P, K/gk, N, 2] bf16   per kernel group of ``gk`` rows: (S, Z) with
                                      ``W[k, n] = S * (code - 8) + Z``.
=============  =====================  ==============================================================

GPTQ's ``W = s * (q - z)`` is the same line with ``S = s`` and ``Z = s * (8 - z)``: the codes do not
change. 2- and 3-bit codes fit a nibble (shifted up together with their zeros so that they centre on 8;
stored as 4 bits each, so they take the memory of 4-bit weights). An 8-bit code is split
as ``q = 16 h + l`` and ``z = 16 zh + zl``: ``W = 16 s (h - zh) + s (l - zl)``, two int4 parts whose
outputs add. Group sizes that are a multiple of one the kernel takes (32, 64, 128, 256), and -1, are
run with the largest such kernel group that divides both; the (S, Z) pair is repeated per kernel group.

Numerics: S and Z are each rounded once to bf16 (8 significant bits: relative error <= 2**-8), so the
weight the kernel represents, :func:`represented_weight`, differs from the exact GPTQ weight by at most
``2**-8 * (|S| * |code - 8| + |Z|)`` per part; activations are rounded to bf16 on the way in and the
output on the way out. The exact dequantized reference (:mod:`gptqlab.kernels.reference`) stays the
oracle; tests/kernels/test_cpu_int4.py checks both bounds.
"""

from __future__ import annotations

import torch

from gptqlab.quant.pack import SUPPORTED_BITS

BLOCK_N = 64
"""Columns per block of the int4pack layout."""

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
"""Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts, largest first."""

DENSE_MIN_ROWS = 160
"""From this many activation rows on, dequantize tiles to bf16 and use a dense matmul (oneDNN, AMX where
the CPU has it) instead of the int4 kernel. Measured with one thread at 4096x4096, 4-bit, on the 2-core
AMX Xeon (``gptqlab bench kernels --device cpu --shapes 4096x4096 --shrink 1 --bits 4 --batches
1,16,128,192,256``, rows "gptqlab-int4" and "gptqlab-dense-tile" of
benchmarks/results/cpu-2core/kernels-cpu-7b-w4.json): the int4 kernel's time grows linearly with M
(about 0.85 ms per row there), the tile path costs a fixed dequantization (~70-110 ms, in torch ops)
plus a cheap AMX matmul. At M = 128 the int4 kernel was 1.07x faster (108 vs 115 ms); at M = 192 the
tile path was 1.45x faster (111 vs 162 ms), at 256 1.68x (131 vs 220 ms)."""

TILE_COLUMNS = 512
"""Columns dequantized at a time on the dense path: a [K, 512] bf16 tile is 4 MiB at K = 4096, so no
dequantized copy of the whole layer exists at any time."""

_DTYPE = torch.bfloat16  # the kernel's vectorized path; fp16 and fp32 inputs run a scalar loop 30-80x slower


def kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernel and its packing op (torch >= 2.6)."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def kernel_group_size(in_features: int, group_size: int) -> int | None:
    """The kernel group for a checkpoint group: the largest of :data:`KERNEL_GROUP_SIZES` that divides both
    the checkpoint's group size (K for -1) and K, so that each kernel group lies in one GPTQ group; None if
    there is none."""
    whole = in_features if group_size == -1 else group_size
    for gk in KERNEL_GROUP_SIZES:
        if whole % gk == 0 and in_features % gk == 0:
            return gk
    return None


def unsupported_reason(in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """Why a layer cannot use the int4 kernel, or None if it can."""
    if not kernel_available():
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu (needs torch >= 2.6)"
    if bits not in SUPPORTED_BITS:
        return f"no CPU kernel for {bits}-bit weights"
    if out_features % 2:
        return f"out_features {out_features} is odd; the int4 layout pairs columns"
    if kernel_group_size(in_features, group_size) is None:
        return (
            f"group_size {group_size} with in_features {in_features} has no common divisor among the kernel's "
            f"group sizes {KERNEL_GROUP_SIZES}"
        )
    return None


def _nibble_parts(codes: torch.Tensor, zeros: torch.Tensor, bits: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(codes [K, N] in [0, 16), zeros [G, N], multiplier) for each int4 part; W = sum of mult * s * (c - z).

    2- and 3-bit codes and zeros are both shifted up by ``8 - 2**(bits-1)``, which leaves ``c - z`` as it is
    but centres the codes on the kernel's 8, so that ``Z = s * (8 - z)`` stays small and so does its bf16
    rounding error."""
    if bits in (2, 3):
        shift = 8 - 2 ** (bits - 1)
        return [(codes + shift, zeros.to(torch.int32) + shift, 1)]
    if bits == 4:
        return [(codes, zeros, 1)]
    return [(codes >> 4, zeros.to(torch.int32) >> 4, 16), (codes & 15, zeros.to(torch.int32) & 15, 1)]


def repack(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Repack one layer for the int4 kernel; call once at load time.

    codes: [K, N] int32 in [0, 2**bits), rows in kernel order (act-order already applied).
    zeros: [G, N] integer actual zero points. scales: [G, N] float. Groups are contiguous.
    returns: (weight [P, N, K/2] uint8, scale_zeros [P, K/gk, N, 2] bf16, gk), layout in the module
        docstring. Raises ValueError naming the reason when :func:`unsupported_reason` has one.
    """
    k, n = codes.shape
    reason = unsupported_reason(k, n, bits, group_size)
    if reason is not None:
        raise ValueError(reason)
    gk = kernel_group_size(k, group_size)
    whole = k if group_size == -1 else group_size
    rep = whole // gk  # kernel groups per GPTQ group
    s = scales.to(torch.float32)
    weights, pairs = [], []
    for part_codes, part_zeros, mult in _nibble_parts(codes, zeros, bits):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(part_codes.t().contiguous().to(torch.int32), 1)
        scale = mult * s  # exact: a power of two times an fp32 value
        zero = scale * (8 - part_zeros.to(torch.float32))  # exact in fp32: |8 - z| <= 2**bits
        pair = torch.stack([scale, zero], -1).repeat_interleave(rep, 0)[: k // gk]  # [K/gk, N, 2]
        weights.append(packed)
        pairs.append(pair.to(_DTYPE))
    return torch.stack(weights), torch.stack(pairs), gk


def unpack_codes(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of the packing op for one part: weight [N, K/2] uint8 → codes [K, N] int32 in [0, 16)."""
    n = weight.shape[0]
    full = n - n % BLOCK_N
    cols = []
    if full:
        b = weight[:full].reshape(full // BLOCK_N, in_features, BLOCK_N // 2)  # [N/64, K, 32]
        c = torch.cat([b & 15, b >> 4], -1)  # [N/64, K, 64]: low nibbles are columns 0-31 of a block
        cols.append(c.permute(1, 0, 2).reshape(in_features, full))
    if n > full:
        b = weight[full:].reshape(in_features, (n - full) // 2)  # [K, r/2]
        cols.append(torch.stack([b & 15, b >> 4], -1).reshape(in_features, n - full))
    return torch.cat(cols, 1).to(torch.int32)


def represented_weight(weight: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The weight the kernel computes with, [K, N] fp32: sum over parts of ``S * (code - 8) + Z``.

    weight: [P, N, K/2] uint8; scale_zeros: [P, K/gk, N, 2] bf16; group: gk. Each term is exact in fp32.
    """
    k = scale_zeros.shape[1] * group
    total = None
    for part, pair in zip(weight, scale_zeros, strict=True):
        codes = unpack_codes(part, k).to(torch.float32)  # [K, N]
        pair = pair.to(torch.float32).repeat_interleave(group, 0)  # [K, N, 2]
        w = pair[..., 0] * (codes - 8) + pair[..., 1]
        total = w if total is None else total + w
    return total


def _int4_matmul(x: torch.Tensor, weight: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] bf16 → [M, N] bf16 through the int4 kernel, summing the parts (indexed, not iterated:
    iterating a tensor unbinds it, which costs more than the kernel at small shapes)."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight[0], group, scale_zeros[0])
    for p in range(1, weight.shape[0]):
        out += torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight[p], group, scale_zeros[p])
    return out


def _dense_tile_matmul(x: torch.Tensor, weight: torch.Tensor, scale_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] bf16 → [M, N] bf16: dequantize :data:`TILE_COLUMNS` columns at a time to bf16, then a dense
    matmul. Needs N % 64 == 0. Per tile: the bytes are put in [K, cols] order first (uint8, an eighth of
    the bf16 bytes), then one fp32 multiply-add per weight and one rounding to bf16."""
    m, k = x.shape
    n = weight.shape[1]
    out = torch.empty(m, n, dtype=x.dtype)
    for c0 in range(0, n, TILE_COLUMNS):
        c1 = min(n, c0 + TILE_COLUMNS)
        blocks = (c1 - c0) // BLOCK_N
        tile = None
        for part, pair in zip(weight, scale_zeros, strict=True):
            raw = part[c0:c1].reshape(blocks, k, BLOCK_N // 2).transpose(0, 1).contiguous()  # [K, b, 32]
            codes = torch.cat([raw & 15, raw >> 4], -1).view(k // group, group, c1 - c0)  # [G, gk, cols]
            sz = pair[:, c0:c1].to(torch.float32)  # [G, cols, 2]
            scale = sz[..., 0].unsqueeze(1)  # [G, 1, cols]
            w = torch.addcmul(sz[..., 1].unsqueeze(1) - 8 * scale, codes.to(torch.float32), scale)
            tile = w if tile is None else tile.add_(w)
        torch.matmul(x, tile.view(k, c1 - c0).to(x.dtype), out=out[:, c0:c1])
    return out


def path_for(rows: int, out_features: int) -> str:
    """ "int4" or "dense-tile" for a call with ``rows`` rows of activations (see :data:`DENSE_MIN_ROWS`)."""
    return "dense-tile" if rows >= DENSE_MIN_ROWS and out_features % BLOCK_N == 0 else "int4"


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_zeros: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``x @ W + bias`` on the CPU for a layer from :func:`repack`.

    x: [..., K] any float dtype (computed in bf16, returned in x.dtype); weight [P, N, K/2] uint8;
    scale_zeros [P, K/gk, N, 2] bf16; group: gk; bias [N] or None (added in fp32).
    path: "int4", "dense-tile" or None for :func:`path_for`.
    """
    k = x.shape[-1]
    n = weight.shape[1]
    x2 = x.reshape(-1, k).to(_DTYPE)  # [M, K]
    if scale_zeros.dtype != _DTYPE:  # a module cast (model.half()) converted the buffer; the kernel needs bf16
        scale_zeros = scale_zeros.to(_DTYPE)
    path = path or path_for(x2.shape[0], n)
    if path == "int4":
        out = _int4_matmul(x2, weight, scale_zeros, group)
    elif path == "dense-tile":
        out = _dense_tile_matmul(x2, weight, scale_zeros, group)
    else:
        raise ValueError(f"path must be 'int4' or 'dense-tile', got {path!r}")
    if bias is not None:
        out = out.to(torch.float32).add_(bias)
    return out.to(x.dtype).view(*x.shape[:-1], n)
