"""The in-memory layout that every GPTQ matmul in ``gptqlab.kernels`` reads, and its validation.

Notation: K = in_features, N = out_features, G = number of groups, bits in {2, 3, 4, 8}.

=========  ======================  ==========================================================================
tensor     shape / dtype           meaning
=========  ======================  ==========================================================================
qweight    [K*bits/32, N] int32    codes packed along K exactly as in the checkpoint (``pack_rows``): word r
                                   holds inputs r*(32/bits)+j at bit offset bits*j. Rows may have been
                                   permuted at load time (act-order); the kernels do not care.
zeros      [G, N] uint8/int16/     the *actual* zero point z, unpacked, with the v1 offset already added.
           int32                   QuantLinear keeps uint8 (int16 when a v1 file yields z = 256), which
                                   halves zero traffic against int32 at group size 32.
scales     [G, N] float            one scale per group and output, kept in the checkpoint dtype (fp16).
g_idx      [K] int                 group of each input row; only the torch reference takes it. The Triton
                                   kernels assume contiguous groups: row k belongs to group k // group_size.
=========  ======================  ==========================================================================

Numerics. The reference (``reference.py``) computes

    W[k, n] = to(dtype)( float32(scales[g, n]) * float32(q[k, n] - zeros[g, n]) ),   g = g_idx[k]
    out     = to(x.dtype)( sum_k float32(x[m, k]) * float32(W[k, n]) + float32(bias[n]) )

``q - z`` is an integer with |q - z| <= 2**bits, so it is exact in fp32, and for fp16 or bf16 scales the
product is exact as well: W is the correctly rounded product in ``dtype`` (= x.dtype). The kernels:

* gemm, and gemv tiles that span groups: the same W (rounded once), fp32 sums; they differ from the
  reference only in the summation order;
* gemv tiles inside one group (4-bit and 8-bit at group size 128, the common case): q - z enters the
  tensor-core dot unrounded and the fp32 result is multiplied by the fp16 scale, so the output is the
  exact product with the checkpoint's W rounded once (up to fp32 summation error, ~2**-24 relative).
  It differs from the reference by at most the reference's rounding of W, eps/2 * sum_k |x W|.

Both hold for fp16 and bf16 activations alike: bf16 is computed in fp32 from the fp16 scales, never
through a bf16 copy of a scale. Tolerances (tests/kernels/test_triton_kernels.py): one rounding of
x.dtype (rtol = eps: 2**-10 fp16, 2**-7 bf16) against the exact product for one-group gemv tiles;
eps/2 * sum |x W| + eps * |exact| for the rounded-W paths.
"""

from __future__ import annotations

import torch

from gptqlab.quant.pack import SUPPORTED_BITS

KERNEL_BITS = (2, 4, 8)
"""Bit widths with a Triton kernel. 3-bit codes straddle int32 words and use the torch reference."""

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Activation dtypes the Triton kernels accept; the output has the same dtype."""

GEMV_MAX_M = 16
"""Rows of x up to which the decode (gemv) kernel is used; above it the tiled GEMM."""


def resolve_group_size(group_size: int, in_features: int) -> int:
    """Group size as a positive row count: -1 (one group over all inputs) becomes ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be a positive number of input rows or -1, got {group_size}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """G = ceil(K / group_size); the last group may be shorter."""
    return -(-in_features // resolve_group_size(group_size, in_features))


def check_operands(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate a dequant-matmul call against the layout above; return (M, N, K) for ``x`` of shape [M, K].

    Raises ValueError naming the argument, its shape and the shape it should have.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K]; flatten leading dims first, got shape {tuple(x.shape)}")
    m, k = x.shape
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D int32 [K*bits/32, N], got {qweight.dtype} {tuple(qweight.shape)}")
    if qweight.shape[0] * 32 != k * bits:
        raise ValueError(
            f"qweight has {qweight.shape[0]} packed rows, which hold {qweight.shape[0] * 32 // bits} inputs of "
            f"{bits} bits, but x has K={k} columns"
        )
    n = qweight.shape[1]
    g = num_groups(k, group_size)
    if zeros.shape != (g, n) or zeros.dtype.is_floating_point or zeros.dtype == torch.bool:
        raise ValueError(
            f"zeros must be an unpacked integer tensor [G, N] = [{g}, {n}] (K={k}, group_size={group_size}); "
            f"got {zeros.dtype} {tuple(zeros.shape)}. Unpack qzeros with gptqlab.quant.pack.unpack_cols first."
        )
    if scales.shape != (g, n) or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be a float tensor [G, N] = [{g}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    tensors = [x, qweight, zeros, scales] + ([bias] if bias is not None else [])
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all operands must be on one device, got {sorted(str(d) for d in devices)}")
    return m, n, k
