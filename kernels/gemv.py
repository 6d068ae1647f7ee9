"""Split-K dequant-GEMV for decoding (M <= 16): ``out = x @ W + bias``, aimed at memory bandwidth.

At decode sizes the work is reading the packed weight once; everything else is small. The kernel:

* splits the weight into [BLOCK_KP packed rows, BLOCK_N] tiles and spreads them over a 2-D grid of
  (column blocks) x (SPLIT_K slices of K), so a 4096 x 4096 layer gives a few hundred programs even
  though N / BLOCK_N alone would not fill the GPU. Each slice adds its partial sums into an fp32 output
  with ``atomic_add`` (the wrapper zeroes it and casts it back to x.dtype, two tiny extra launches);
* reads every packed word from HBM exactly once (``evict_first``: the weight stream should not push x
  out of L2) and takes the PACK codes of a word apart in registers: pass j uses the codes at bit offset
  j*BITS, which are input rows ``kp*PACK + j``, against the x values of those rows. There is no
  interleave or reshape, and the scales and zeros are loaded once per word row, not once per code;
* M == 1: multiply-accumulate in fp32 registers ([BLOCK_KP, BLOCK_N] partial sums, one reduction at
  the end); 2 <= M <= 16: tl.dot with the rows padded to 16, which the tensor cores do for free.

The tile is sized in packed rows (BLOCK_KP), so every bit width moves the same bytes per iteration.
A word's codes must share one group: group_size must be a multiple of 32 / bits (true for every GPTQ
group size, which are multiples of 32).
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
from gptqlab.kernels.layout import GEMV_MAX_M


def gemv_configs() -> list[triton.Config]:
    """(BLOCK_N, BLOCK_KP, SPLIT_K) candidates for the autotuner, keyed on (M bucket, N, K).

    BLOCK_N x BLOCK_KP int32 words is 8-32 KiB per iteration and program. For M = 1 the loads feed no
    tl.dot, so triton does not multi-buffer them in shared memory; the bytes in flight come from the
    2-4 programs per SM that 72-176 registers per thread allow (sm_90 compile). SPLIT_K from 1 to 16
    lets narrow layers (N = 4096) and deep ones (K = 11008) both reach a few hundred programs. One
    config under the CPU interpreter (SPLIT_K = 2 to exercise the atomic accumulation).
    """
    if interpreting():
        return [triton.Config({"BLOCK_N": 128, "BLOCK_KP": 16, "SPLIT_K": 2}, num_warps=4)]
    tiles = [(64, 32, 4), (128, 16, 4), (128, 32, 4), (256, 16, 8), (256, 32, 8)]  # (BLOCK_N, BLOCK_KP, warps)
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_KP": kp, "SPLIT_K": sk}, num_warps=w, num_stages=3)
        for bn, kp, w in tiles
        for sk in (1, 4, 8, 16)
    ]


def _prune_gemv_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Skip configs with more K slices than K tiles (the extra programs would only add zeros), and for
    M > 1 tiles of more than 16 words per thread: the tl.dot path holds the dequantized tile in two
    layouts and such tiles spill registers on sm_90 (tests/kernels/test_compile_sm90.py)."""
    args = {**named_args, **kwargs}
    pack = 32 // args["BITS"]

    def fits(c: triton.Config) -> bool:
        words_per_thread = c.kwargs["BLOCK_KP"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        return c.kwargs["SPLIT_K"] <= triton.cdiv(args["K"], c.kwargs["BLOCK_KP"] * pack) and (
            args["M_BUCKET"] == 1 or words_per_thread <= 16
        )

    return [c for c in configs if fits(c)] or configs[:1]


@triton.autotune(
    configs=gemv_configs(),
    key=["M_BUCKET", "N", "K"],
    reset_to_zero=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune_gemv_configs},
)
@triton.heuristics(
    {
        "ONE_GROUP_PER_TILE": lambda args: tile_in_one_group(
            args["BLOCK_KP"] * (32 // args["BITS"]), args["group_size"], args["K"]
        )
    }
)
@triton.jit
def _dequant_gemv_kernel(
    # pointers (out_ptr: fp32, zero-initialized, accumulated with atomics)
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
    BLOCK_KP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ONE_GROUP_PER_TILE: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS  # codes per int32 word
    BLOCK_K: tl.constexpr = BLOCK_KP * PACK  # input rows per tile

    # -- this program's columns and K slice (slices are whole tiles, so only the last tile of K is partial)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_mask = offs_m < M
    rows = tl.arange(0, BLOCK_KP)  # [BLOCK_KP]
    packed_rows = K // PACK

    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)  # per-lane partial sums, reduced after the loop
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_kp = k0 // PACK + rows  # [BLOCK_KP] packed rows of this tile
        kp_mask = offs_kp < packed_rows
        kn_mask = kp_mask[:, None] & n_mask[None, :]  # [BLOCK_KP, BLOCK_N]

        # -- packed words [BLOCK_KP, BLOCK_N], each read from HBM once
        words = tl.load(
            qweight_ptr + offs_kp[:, None] * stride_qk + offs_n[None, :] * stride_qn,
            mask=kn_mask,
            other=0,
            eviction_policy="evict_first",
        )

        # -- scales and zeros: one [BLOCK_N] row when the tile lies in one group, else one row per word row.
        #    The row is loaded 1-D and broadcast: a [1, BLOCK_N] load would impose its own layout (all threads
        #    along N) on the whole loop body and spill registers.
        if ONE_GROUP_PER_TILE:
            g = k0 // group_size
            s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
            z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0)[None, :]
        else:
            g = (offs_kp * PACK) // group_size  # [BLOCK_KP]; a word's codes share a group
            s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=kn_mask, other=0.0)
            z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=kn_mask, other=0)
        s = s.to(tl.float32)
        zb = bias_zeros(z)

        # -- pass j: codes at bit offset j*BITS are input rows offs_kp*PACK + j
        for j in tl.static_range(PACK):
            offs_k = offs_kp * PACK + j  # [BLOCK_KP]
            w = dequantize_codes(words, j * BITS, zb, s, BITS).to(x_ptr.dtype.element_ty)  # [BLOCK_KP, BLOCK_N]
            if BLOCK_M == 1:
                xj = tl.load(x_ptr + offs_k * stride_xk, mask=kp_mask, other=0.0)  # [BLOCK_KP]
                acc += xj.to(tl.float32)[:, None] * w.to(tl.float32)
            else:
                xj = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & kp_mask[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_KP]
                acc = tl.dot(xj, w, acc, input_precision=DOT_PRECISION)

    # -- partial result [BLOCK_M, BLOCK_N]; slice 0 adds the bias; accumulate into the fp32 output
    if BLOCK_M == 1:
        part = tl.sum(acc, axis=0)[None, :]
    else:
        part = acc
    if HAS_BIAS:
        if pid_k == 0:
            part += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        part,
        mask=m_mask[:, None] & n_mask[None, :],
        sem="relaxed",
    )


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W + bias`` for decode batches (M <= 16), split over K with fp32 atomic accumulation.

    x: [M, K] float16, bfloat16 or float32, M <= 16, any strides, on CUDA (or CPU under TRITON_INTERPRET=1).
    qweight: [K*bits/32, N] int32, codes packed along K (``pack_rows`` layout), bits in {2, 4, 8}.
    zeros: [G, N] integer, actual zero points (unpacked, v1 offset applied).
    scales: [G, N] float (fp16 as stored).
    group_size: input rows per group (a multiple of 32 / bits), -1 for one group. Groups must be
        contiguous: row k is in group k // group_size.
    bias: [N] or None.
    returns: [M, N] in x.dtype, accumulated in fp32; equal to ``reference.matmul`` up to summation order.
    """
    m, n, k, gs = check_launch(x, qweight, zeros, scales, bits, group_size, bias)
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got M={m}; use gemm for larger batches")
    out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    if m == 0 or n == 0:
        return out.to(x.dtype)
    if bias is not None:
        bias = bias.contiguous()

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    _dequant_gemv_kernel[grid](
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
        BLOCK_M=1 if m == 1 else 16,
    )
    return out if x.dtype == torch.float32 else out.to(x.dtype)
