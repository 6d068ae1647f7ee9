"""Fused dequant-GEMM for prefill and batched inputs (M > 16): ``out = x @ W + bias``.

Each program computes one [BLOCK_M, BLOCK_N] output tile. Per K step it loads a [BLOCK_M, BLOCK_K] tile
of x and the [BLOCK_K/PACK, BLOCK_N] packed words behind the matching tile of W, unpacks them in
registers to [BLOCK_K/PACK, PACK, BLOCK_N], dequantizes, rounds to x.dtype, merges the first two dims
into [BLOCK_K, BLOCK_N] (row kp*PACK + j is input kp*PACK + j, the order of x's columns) and feeds
tl.dot (tensor cores for fp16/bf16) with an fp32 accumulator. W never exists in floating point in
global memory, and each packed word is loaded and staged in shared memory once.

At these M the kernel is compute bound, and the dequantization (about six ALU ops per weight element)
is paid once per BLOCK_M rows, which is why the tiles are tall.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptqlab.kernels.common import (
    bias_zeros,
    check_launch,
    dequantize_codes,
    dot_precision,
    interpreting,
    m_bucket,
    tile_in_one_group,
)


def gemm_configs() -> list[triton.Config]:
    """Tile shapes the autotuner tries (chosen for H100, fp16/bf16), keyed on (M bucket, N, K).

    The packed-word tile [BLOCK_K, BLOCK_N] int32 stays at <= 64 registers per thread so the dequantized
    tile and the accumulator fit without spilling. Under the CPU interpreter there is one large config:
    benchmarking is meaningless there and small tiles are slow.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "L2_GROUP_M": 8}, num_warps=4)]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "L2_GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


def _prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Skip tiles taller than the (bucketed) M: a 128-row tile for M = 40 mostly multiplies padding."""
    m = {**named_args, **kwargs}["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, m)]
    return kept or configs[:1]


@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.heuristics(
    {"ONE_GROUP_PER_TILE": lambda args: tile_in_one_group(args["BLOCK_K"], args["group_size"], args["K"])}
)
@triton.jit
def _dequant_gemm_kernel(
    # pointers
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    # sizes (M_BUCKET is only the autotune key)
    M,
    N,
    K,
    group_size,
    M_BUCKET,
    # strides
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_om,
    stride_on,
    # meta-parameters
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    L2_GROUP_M: tl.constexpr,
    ONE_GROUP_PER_TILE: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS  # codes per int32 word
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK  # packed rows per K tile

    # -- program -> output tile. Programs sweep a band of L2_GROUP_M tile rows column by column, so the
    #    weight tiles a band needs are read from HBM once and then served from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band_programs = L2_GROUP_M * tiles_n
    first_m = (pid // band_programs) * L2_GROUP_M
    band_rows = tl.minimum(tiles_m - first_m, L2_GROUP_M)
    pid_m = first_m + (pid % band_programs) % band_rows
    pid_n = (pid % band_programs) // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_kb = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_kpb = tl.arange(0, BLOCK_KP)  # [BLOCK_KP]
    shifts = tl.arange(0, PACK) * BITS  # [PACK] bit offset of code j in a word
    packed_rows = K // PACK

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb  # [BLOCK_K]
        offs_kp = k0 // PACK + offs_kpb  # [BLOCK_KP]
        kp_mask = offs_kp < packed_rows
        kn_mask = kp_mask[:, None] & n_mask[None, :]  # [BLOCK_KP, BLOCK_N]

        # -- activations [BLOCK_M, BLOCK_K]
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )

        # -- packed words [BLOCK_KP, BLOCK_N], each loaded once (and staged in shared memory once)
        words = tl.load(
            qweight_ptr + offs_kp[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=kn_mask,
            other=0,
        )

        # -- scales and zeros: one [BLOCK_N] row (loaded 1-D, see gemv.py) when the tile lies in one group,
        #    else one row per word row (the codes of a word share a group)
        if ONE_GROUP_PER_TILE:
            g = k0 // group_size
            s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
            z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0)[None, :]
        else:
            g = (offs_kp * PACK) // group_size  # [BLOCK_KP]
            s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=kn_mask, other=0.0)
            z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=kn_mask, other=0)

        # -- unpack to [BLOCK_KP, PACK, BLOCK_N] (exact fp32), round once to x.dtype; merging the first two
        #    dims gives row kp*PACK + j = input k0 + kp*PACK + j, the order of x's columns
        w = dequantize_codes(
            words[:, None, :], shifts[None, :, None], bias_zeros(z)[:, None, :], s.to(tl.float32)[:, None, :], BITS
        )
        w = tl.reshape(w.to(x_ptr.dtype.element_ty), (BLOCK_K, BLOCK_N))  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # -- epilogue: bias in fp32, one rounding to the output dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W + bias`` with W dequantized tile by tile in registers. For M > 16; any M works.

    x: [M, K] float16, bfloat16 or float32, any strides, on CUDA (or CPU under TRITON_INTERPRET=1).
    qweight: [K*bits/32, N] int32, codes packed along K (``pack_rows`` layout), bits in {2, 4, 8}.
    zeros: [G, N] integer, actual zero points (unpacked, v1 offset applied).
    scales: [G, N] float (fp16 as stored).
    group_size: input rows per group (a multiple of 32 / bits), -1 for one group. Groups must be
        contiguous: row k is in group k // group_size (QuantLinear reorders act-order checkpoints at load
        time to make it so).
    bias: [N] or None.
    returns: [M, N] in x.dtype, accumulated in fp32; equal to ``reference.matmul`` up to summation order.
    """
    m, n, k, gs = check_launch(x, qweight, zeros, scales, bits, group_size, bias)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _dequant_gemm_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        bias,
        out,
        m,
        n,
        k,
        gs,
        m_bucket(m),
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0),
        zeros.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return out
