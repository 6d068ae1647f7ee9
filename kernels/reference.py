"""Pure-torch GPTQ dequantization and dequant-matmul: the reference for the Triton kernels and the CPU path.

The dequantized weight is one exact fp32 product rounded once to the activation dtype, and the matmul
accumulates in fp32. The gemm computes the same values in another summation order; the gemv, for K tiles
inside one group, skips the rounding of W (``layout.py`` gives both contracts and their tolerances).

Unlike the kernels, these functions take ``g_idx`` and so handle any group assignment, including
act-order checkpoints that were not reordered at load time. They materialize one layer's [K, N] weight,
so callers dequantize one layer at a time.
"""

from __future__ import annotations

import torch

from gptqlab.kernels.layout import num_groups, resolve_group_size
from gptqlab.quant.pack import unpack_rows


def contiguous_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """g_idx without act-order: input row k belongs to group k // group_size. Returns [K] int32."""
    gs = resolve_group_size(group_size, in_features)
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs


def dequantize(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize one layer.

    qweight: [K*bits/32, N] int32, codes packed along K (``pack_rows`` layout).
    zeros: [G, N] integer, the actual zero points (unpacked, v1 offset applied).
    scales: [G, N] float.
    g_idx: [K] integer, the group of each input row.
    dtype: result dtype; defaults to ``scales.dtype``.
    returns: W [K, N], ``W[k, n] = scales[g, n] * (q[k, n] - zeros[g, n])`` with g = g_idx[k], computed
        exactly in fp32 and rounded once to ``dtype``.
    """
    codes = unpack_rows(qweight, bits)  # [K, N] int32
    k, n = codes.shape
    if g_idx.shape != (k,):
        raise ValueError(f"g_idx must have shape [K] = [{k}], got {tuple(g_idx.shape)}")
    if zeros.shape != scales.shape or zeros.shape[1] != n:
        raise ValueError(
            f"zeros and scales must both be [G, N] with N={n}, got {tuple(zeros.shape)} and {tuple(scales.shape)}"
        )
    g = g_idx.long()
    diff = (codes - zeros.to(torch.int32)[g]).to(torch.float32)  # [K, N], exact: |q - z| <= 2**bits
    w = scales.to(torch.float32)[g] * diff  # [K, N]
    return w.to(scales.dtype if dtype is None else dtype)


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W (+ bias)`` with W from :func:`dequantize` rounded to ``x.dtype``; fp32 accumulation.

    x: [..., K]; bias: [N] or None. returns: [..., N] in ``x.dtype``.
    """
    k = x.shape[-1]
    w = dequantize(qweight, zeros, scales, g_idx, bits, dtype=x.dtype)  # [K, N]
    if w.shape[0] != k:
        raise ValueError(f"x has {k} input features but qweight holds {w.shape[0]}")
    out = x.reshape(-1, k).to(torch.float32) @ w.to(torch.float32)  # [M, N]
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


def matmul_contiguous(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`matmul` for contiguous groups (row k in group k // group_size), the kernels' contract."""
    k = x.shape[-1]
    if zeros.shape[0] != num_groups(k, group_size):
        raise ValueError(
            f"zeros has {zeros.shape[0]} groups; K={k} with group_size={group_size} needs {num_groups(k, group_size)}"
        )
    return matmul(x, qweight, zeros, scales, contiguous_g_idx(k, group_size, x.device), bits, bias)
