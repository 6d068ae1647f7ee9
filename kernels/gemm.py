"""Fused dequant-GEMM for prefill and batched inputs (M > 16): ``out = x @ W + bias``, one launch.

Each program computes one output tile, as its transpose: ``acc [BLOCK_N, BLOCK_M] = W^T x^T`` with the
dequantized weights as the *left* tensor-core operand. On Hopper the left operand of ``wgmma`` may come
from registers, so the dequantized tile goes from the dequantization straight into the tensor cores:
no per-element round trip through shared memory. x^T, the right operand, and the packed words are
loaded to shared memory by triton's pipeliner (cp.async, num_stages deep), so the next tiles' loads
overlap this tile's dequantization and wgmma. The wgmma itself is not left in flight across tiles:
triton 3.9 waits for a wgmma with a register operand (``wgmma.wait_group 0``) before the next tile,
which ``kernel_static`` reports as ``wgmma_async: false``.

Per K tile (BLOCK_KP packed rows = BLOCK_K inputs) the program loads the words as int16 halves
[BLOCK_KP, BLOCK_N, 2] and dequantizes them with :mod:`gptqlab.kernels.dequant` (packed fp16 pairs for
fp16, exact fp32 otherwise) into the operand order of ``dequant.weight_tile``; x is loaded in input order
(through ``perm`` for act-order checkpoints) and permuted in registers to the same K order. When a K
tile lies in one group, its row of scales and zeros is loaded one iteration ahead (software pipelining:
the loads overlap the previous tile's dequantization and wgmma; +11 SASS instructions per iteration).

Numerics: W = x.dtype((q - z) * s), rounded once as in the reference, then fp32 sums. (The gemv instead
puts q - z into the dot and scales the fp32 result when a tile lies in one group. Here that would cost
one FFMA per output per tile, BLOCK_M / 2 times more than the HMUL2 per weight pair, and triton 3.9
waits for each wgmma with a register operand before the next tile anyway: ``wgmma_async`` in the static
report.)

Cost: ``python -m gptqlab.benchmarks.kernel_static`` (SASS per weight, registers, spills, predicted time);
measured by ``python -m gptqlab.benchmarks.gpu_check``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptqlab.kernels.common import check_launch, dot_precision, interpreting, m_bucket, tile_in_one_group
from gptqlab.kernels.dequant import dequantize_halves, dequantize_halves_exact, dot_row_order, use_asm, weight_tile


def gemm_configs() -> list[triton.Config]:
    """Tile shapes the autotuner tries (chosen for H100, fp16/bf16), keyed on (M bucket, N, K, bits, group).

    BLOCK_N is the wgmma M dimension (64 rows per warpgroup of 4 warps), BLOCK_M its N dimension. At
    M = 256 and N = 4096, 64 x 128 tiles give 64 x 2 = 128 programs for 132 SMs (128 x 128 tiles gave 64).
    BLOCK_KP = 16 packed rows is one 128-row group at 4 bits, so the scales apply after the dot. Under
    the CPU interpreter there is one config: benchmarking is meaningless there and small tiles are slow.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_KP": 16, "L2_GROUP_M": 8}, num_warps=4)]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_KP, num_warps, num_stages)
        (32, 64, 16, 4, 4),
        (64, 64, 16, 4, 4),
        (128, 64, 16, 4, 3),
        (64, 128, 16, 8, 3),
        (128, 128, 16, 8, 3),
        (128, 64, 8, 4, 4),
        (128, 128, 8, 8, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KP": kp, "L2_GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bn, kp, w, st in tiles
    ]


def _prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs that fit the call: tiles no taller than the (bucketed) M (a 128-row tile for
    M = 40 mostly multiplies padding); K tiles of at most 128 inputs (one group of 128; 2-bit tiles of
    256 rows spill); with act-order at most 64 rows of x, which is then gathered into registers rather
    than copied to shared memory by cp.async, and larger tiles spill (sm_90 compiles)."""
    args = {**named_args, **kwargs}
    pack = 32 // args["BITS"]

    def fits(c: triton.Config) -> bool:
        return (
            c.kwargs["BLOCK_M"] <= max(32, args["M_BUCKET"])
            and c.kwargs["BLOCK_KP"] * pack <= 128
            and not (args.get("HAS_PERM", False) and c.kwargs["BLOCK_M"] > 64)
        )

    kept = [c for c in configs if fits(c)]
    return kept or configs[:1]


@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "BITS", "group_size"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.heuristics(
    {
        "ONE_GROUP_PER_TILE": lambda args: tile_in_one_group(
            args["BLOCK_KP"] * (32 // args["BITS"]), args["group_size"], args["K"]
        ),
        "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0,
        "EVEN_K": lambda args: args["K"] % (args["BLOCK_KP"] * (32 // args["BITS"])) == 0,
    }
)
@triton.jit
def _dequant_gemm_kernel(
    # pointers (halves_ptr: qweight viewed as int16)
    x_ptr,
    perm_ptr,
    halves_ptr,
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
    # strides (stride_hk: int16 elements between word rows; halves of a word and words are contiguous)
    stride_xm,
    stride_xk,
    stride_hk,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_om,
    stride_on,
    # meta-parameters
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    PACKED_FP16: tl.constexpr,
    USE_ASM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    L2_GROUP_M: tl.constexpr,
    ONE_GROUP_PER_TILE: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS  # codes per int32 word
    C: tl.constexpr = 16 // BITS  # codes per int16 half
    BLOCK_K: tl.constexpr = BLOCK_KP * PACK  # input rows per K tile

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
    # masks are constant true (and compile away) when the shape divides into tiles, as 7B layers do
    n_mask = (offs_n < N) | EVEN_N
    rows = tl.arange(0, BLOCK_KP)  # [BLOCK_KP]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    half_cols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # [2*BLOCK_N] int16 columns: 2n + half
    half_mask = (half_cols < 2 * N) | EVEN_N
    packed_rows = K // PACK

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output tile, transposed
    if ONE_GROUP_PER_TILE:  # the first tile's scales and zeros (the loop prefetches one tile ahead)
        g_first = tl.minimum(0, K - 1) // group_size
        s_next = tl.load(scales_ptr + g_first * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
        z_next = tl.load(zeros_ptr + g_first * stride_zg + offs_n * stride_zn, mask=n_mask, other=0)
    for k0 in range(0, K, BLOCK_K):
        offs_kp = k0 // PACK + rows  # [BLOCK_KP]
        kp_mask = (offs_kp < packed_rows) | EVEN_K

        # -- packed words as int16 halves [BLOCK_KP, BLOCK_N, 2] (16-byte loads, then split per word)
        halves = tl.load(
            halves_ptr + offs_kp[:, None] * stride_hk + half_cols[None, :],
            mask=kp_mask[:, None] & half_mask[None, :],
            other=0,
        )
        halves = tl.reshape(halves, (BLOCK_KP, BLOCK_N, 2))

        # -- scales and zeros: one [BLOCK_N] row when the tile lies in one group, else one per word row
        if ONE_GROUP_PER_TILE:
            # this tile's row was loaded one iteration ago; load the next tile's now (clamped to the last
            # group), so the scale and zero loads overlap this tile's work instead of stalling it
            s, z1 = s_next, z_next  # [BLOCK_N]
            g_next = tl.minimum(k0 + BLOCK_K, K - 1) // group_size
            s_next = tl.load(scales_ptr + g_next * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
            z_next = tl.load(zeros_ptr + g_next * stride_zg + offs_n * stride_zn, mask=n_mask, other=0)
            z = z1[None, :, None]
            s3 = s[None, :, None]
        else:
            g = (offs_kp * PACK) // group_size  # [BLOCK_KP]
            sz_mask = kp_mask[:, None] & n_mask[None, :]
            s3 = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=sz_mask, other=0.0)
            z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=sz_mask, other=0)
            s3 = s3[:, :, None]
            z = z[:, :, None]

        # -- W^T [BLOCK_N, BLOCK_K]: q - z in one group (s applies after the dot), else (q - z)*s rounded
        if PACKED_FP16:
            w = dequantize_halves(halves, z, s3.to(tl.float16), BITS, True, USE_ASM)
        else:
            w = dequantize_halves_exact(halves, z, s3, BITS, x_ptr.dtype.element_ty, True)
        w = weight_tile(w, BLOCK_KP, BLOCK_N, C, True)

        # -- x^T [BLOCK_K, BLOCK_M] in the same K order (input order load, through perm for act-order)
        k_in = k0 + offs_k  # [BLOCK_K]
        k_mask = (k_in < K) | EVEN_K
        if HAS_PERM:
            k_in = tl.load(perm_ptr + k_in, mask=k_mask, other=0)
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k_in[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        xt = tl.trans(dot_row_order(xt, BLOCK_M, BLOCK_KP, C))

        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)

    # -- epilogue: bias in fp32, one rounding to x.dtype, the transposed tile stored in place
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(
        out_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om,
        acc.to(out_ptr.dtype.element_ty),
        mask=n_mask[:, None] & m_mask[None, :],
    )


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``x[:, perm] @ W + bias`` with W dequantized tile by tile in registers, one launch. For M > 16; any M works.

    x: [M, K] float16, bfloat16 or float32, any strides, on CUDA (or CPU under TRITON_INTERPRET=1).
    qweight: [K*bits/32, N] int32, codes packed along K (``pack_rows`` layout), bits in {2, 4, 8}; made
        contiguous if it is not (the kernel reads it as int16 halves).
    zeros: [G, N] integer, actual zero points (unpacked, v1 offset applied).
    scales: [G, N] float (fp16 as stored).
    group_size: input rows per group (a multiple of 32 / bits), -1 for one group. Groups must be
        contiguous: row k is in group k // group_size (QuantLinear reorders act-order checkpoints at load
        time to make it so, and passes the order as ``perm``).
    bias: [N] or None.
    perm: [K] integer or None: x is read as x[:, perm], gathered in the kernel's load.
    config: run this config instead of the autotuned one (benchmarks: ``gpu_check`` sweeps the configs).
    returns: [M, N] in x.dtype, accumulated in fp32 (numerics: see the module docstring).
    """
    m, n, k, gs = check_launch(x, qweight, zeros, scales, bits, group_size, bias)
    if perm is not None and perm.shape != (k,):
        raise ValueError(f"perm must have shape [K] = [{k}], got {tuple(perm.shape)}")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    halves = qweight.contiguous().view(torch.int16)  # [K*bits/32, 2N]

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel, chosen = _dequant_gemm_kernel, {}
    if config is not None:  # skip the autotuner: its heuristics-wrapped kernel with this config
        kernel, chosen = _dequant_gemm_kernel.fn, config.all_kwargs()
    kernel[grid](
        x,
        perm,
        halves,
        scales,
        zeros,
        None if bias is None else bias.contiguous(),
        out,
        m,
        n,
        k,
        gs,
        m_bucket(m),
        x.stride(0),
        x.stride(1),
        halves.stride(0),
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0),
        zeros.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        HAS_BIAS=bias is not None,
        HAS_PERM=perm is not None,
        PACKED_FP16=x.dtype == torch.float16 and scales.dtype == torch.float16,
        USE_ASM=use_asm(),
        DOT_PRECISION=dot_precision(x.dtype),
        **chosen,
    )
    return out
