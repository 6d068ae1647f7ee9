"""Split-K dequant-GEMV for decoding (M <= 16): ``out = x @ W + bias`` in one launch, aimed at HBM bandwidth.

At decode sizes the work is reading the packed weight once; the rest is small. Per program and K tile:

* **words** [BLOCK_KP, BLOCK_N] are read once from HBM (``evict_first``: the weight stream should not
  push x out of L2) as int16 halves [BLOCK_KP, BLOCK_N, 2]: half h of a word holds C = 16 / BITS codes;
* **dequantization** in packed fp16 pairs for fp16 activations (:mod:`gptqlab.kernels.dequant`, about
  1.6 instructions per 4-bit weight), exact fp32 then one rounding for bf16 and fp32 activations;
* **tensor cores for every M**: the C code slots are joined and permuted into a [BLOCK_K, BLOCK_N] tile
  whose rows are the tile's inputs in the order (word row, half, slot bits reversed), and x is loaded
  in that same order, so ``tl.dot`` sums the right products without moving a weight: the order of a
  dot's K axis is free. Rows of x are padded to 16 (the smallest MMA); the padding costs no weight
  traffic (the rows m >= M are masked, so M = 1 loads one row of x);
* **act-order**: with ``perm`` the x columns are gathered through it in the same load (no index_select);
* **one launch per call**: a grid of (column blocks) x (SPLIT_K slices of K). With SPLIT_K > 1 each slice
  stores its fp32 partial [M, BLOCK_N] to a workspace and increments a per-column-block counter
  (acq_rel atomic after a CTA barrier); the slice that arrives last sums the partials in slice order
  (deterministic), adds the bias, writes x.dtype and resets the counter to 0 for the next call. The
  counters are zeroed once per device and are self-cleaning (two calls on one device must not run
  concurrently on different streams); the workspace is ``torch.empty`` (no fill).

Cost (sm_90 compile, ``python -m gptqlab.benchmarks.kernel_static``): SASS instructions per weight in the
main loop of the selected configs, registers and spills; the speed on a GPU is measured by
``python -m gptqlab.benchmarks.gpu_check``.

A word's codes must share one group: group_size must be a multiple of 32 / bits (every GPTQ group size).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gptqlab.kernels.common import (
    check_launch,
    dot_precision,
    interpreting,
    m_bucket,
    tile_in_one_group,
)
from gptqlab.kernels.dequant import dequantize_halves, dequantize_halves_exact, dot_row_order, use_asm, weight_tile
from gptqlab.kernels.layout import GEMV_MAX_M

BLOCK_M = 16
"""Rows of x per program: the smallest tensor-core tile; M < 16 is padded (no extra weight traffic)."""
MIN_BLOCK_N = 64
"""Smallest BLOCK_N in :func:`gemv_configs`; sizes the split-K counters."""


GEMV_TILES = ((64, 16, 1), (128, 16, 2), (256, 16, 2), (128, 8, 2))
"""(BLOCK_N, BLOCK_KP, num_warps) of the gemv autotune list. 16 packed rows are one 128-row group at 4 bits
(64 rows at 8 bits), so the scales apply after the dot; 8 rows do the same for 2 bits. Few warps and wide
tiles give each thread 32-64 words per iteration, over which the per-tile work (scales, zeros, x, the
fp32 scaling of the dot) is spread: ``kernel_static`` counts 2.2-2.5 SASS instructions per 4-bit weight
for the 16-row tiles, 2.8-3.0 for 4-warp 128-column tiles. A single-warp 128 x 16 tile (2.3) spills."""
SPLITS = (1, 2, 4, 8, 16)
MAX_REGISTERS = 255
"""ptxas register cap. Without an explicit one, ptxas stopped at 168 registers and spilled 8 bytes in some
M = 16 tiles; with 255 no fp16 tile spills (sm_90 compiles, tests/kernels/test_compile_sm90.py)."""
MAX_TILE_ROWS = 128
"""Input rows per K tile at most: a tile then lies in one group of 128, and 2-bit tiles of 256 rows spill."""


def gemv_configs() -> list[triton.Config]:
    """(BLOCK_N, BLOCK_KP, SPLIT_K) candidates for the autotuner, keyed on (M bucket, N, K, bits, group size).

    SPLIT_K from 1 to 16 lets narrow layers (N = 4096) and deep ones (K = 11008) reach a few hundred
    programs for 132 SMs. num_stages = 3: triton's pipeliner keeps two tiles of words in flight through
    shared memory (cp.async), which with several programs per SM is what HBM bandwidth needs. One
    config under the CPU interpreter (SPLIT_K = 2 to exercise the split-K reduction).
    """
    if interpreting():
        return [triton.Config({"BLOCK_N": 64, "BLOCK_KP": 16, "SPLIT_K": 2}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_KP": kp, "SPLIT_K": sk}, num_warps=w, num_stages=3, maxnreg=MAX_REGISTERS)
        for bn, kp, w in GEMV_TILES
        for sk in SPLITS
    ]


def words_per_thread(config: triton.Config) -> int:
    """Packed words each thread loads per K tile."""
    return config.kwargs["BLOCK_KP"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


def _prune_gemv_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs that fit the call: K tiles of at most MAX_TILE_ROWS inputs; no more K slices than
    K tiles (extra programs would only add zeros); at most 32 words per thread for bf16/fp32 activations
    (their fp32 dequantization holds more registers and spills on sm_90, tests/kernels/test_compile_sm90.py)."""
    args = {**named_args, **kwargs}
    pack = 32 // args["BITS"]

    def fits(c: triton.Config) -> bool:
        rows = c.kwargs["BLOCK_KP"] * pack
        return (
            rows <= MAX_TILE_ROWS
            and c.kwargs["SPLIT_K"] <= triton.cdiv(args["K"], rows)
            and not (words_per_thread(c) > 32 and not args.get("PACKED_FP16", True))
        )

    return [c for c in configs if fits(c)] or configs[:1]


@triton.autotune(
    configs=gemv_configs(),
    key=["M_BUCKET", "N", "K", "BITS", "group_size"],
    prune_configs_by={"early_config_prune": _prune_gemv_configs},
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
def _dequant_gemv_kernel(
    # pointers (halves_ptr: qweight viewed as int16; partial_ptr: fp32 workspace; count_ptr: int32 zeros)
    x_ptr,
    perm_ptr,
    halves_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    count_ptr,
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
    SPLIT_K,
    ONE_GROUP_PER_TILE: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS  # codes per int32 word
    C: tl.constexpr = 16 // BITS  # codes per int16 half
    BLOCK_K: tl.constexpr = BLOCK_KP * PACK  # input rows per tile

    # -- this program's columns and K slice (slices are whole tiles; only the last tile of K is partial)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # masks are constant true (and compile away) when the shape divides into tiles, as 7B layers do
    n_mask = (offs_n < N) | EVEN_N
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M]
    m_mask = offs_m < M
    rows = tl.arange(0, BLOCK_KP)  # [BLOCK_KP]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    packed_rows = K // PACK
    half_cols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # [2*BLOCK_N] int16 columns: 2n + half
    half_mask = (half_cols < 2 * N) | EVEN_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_kp = k0 // PACK + rows  # [BLOCK_KP] packed rows of this tile
        kp_mask = (offs_kp < packed_rows) | EVEN_K

        # -- packed words as int16 halves [BLOCK_KP, BLOCK_N, 2], each read from HBM once. Loaded as 2-D
        #    rows of 2*BLOCK_N contiguous halves (16-byte vectors), then split into (column, half).
        halves = tl.load(
            halves_ptr + offs_kp[:, None] * stride_hk + half_cols[None, :],
            mask=kp_mask[:, None] & half_mask[None, :],
            other=0,
            eviction_policy="evict_first",
        )
        halves = tl.reshape(halves, (BLOCK_KP, BLOCK_N, 2))

        # -- scales and zeros: one [BLOCK_N] row when the tile lies in one group, else one row per word row
        #    (a word's codes share a group). Rows are loaded 1-D and broadcast (a [1, BLOCK_N] load would
        #    impose its layout on the loop body and spill registers). Unlike the gemm, the row is not
        #    prefetched a tile ahead: that raised the loop from about 2.4 to 2.8 SASS
        #    instructions per weight (sm_90 compile), above the 2.5 target.
        if ONE_GROUP_PER_TILE:
            g = k0 // group_size
            s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)  # [BLOCK_N]
            z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0)[None, :, None]
            s3 = s[None, :, None]
        else:
            g = (offs_kp * PACK) // group_size  # [BLOCK_KP]
            sz_mask = kp_mask[:, None] & n_mask[None, :]
            s3 = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=sz_mask, other=0.0)
            z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=sz_mask, other=0)
            s3 = s3[:, :, None]
            z = z[:, :, None]

        # -- C slots of [BLOCK_KP, BLOCK_N, 2] weights in x.dtype, then one [BLOCK_K, BLOCK_N] dot operand.
        #    In one group the tile is q - z (exact small integers) and s scales the fp32 dot result: one
        #    multiply per output per tile instead of one per weight. Else W = (q - z)*s, rounded once.
        if PACKED_FP16:
            w = dequantize_halves(halves, z, s3.to(tl.float16), BITS, not ONE_GROUP_PER_TILE, USE_ASM)
        else:
            w = dequantize_halves_exact(halves, z, s3, BITS, x_ptr.dtype.element_ty, not ONE_GROUP_PER_TILE)
        w = weight_tile(w, BLOCK_KP, BLOCK_N, C, False)

        # -- x [BLOCK_M, BLOCK_K]: loaded in input order (16-byte vectors; through perm for act-order
        #    checkpoints), then permuted in registers into the weight tile's row order
        k_in = k0 + offs_k  # [BLOCK_K]
        k_mask = (k_in < K) | EVEN_K
        if HAS_PERM:
            k_in = tl.load(perm_ptr + k_in, mask=k_mask, other=0)
        # (rows m >= M are masked to zero; loading one row and broadcasting it for M = 1 cost 20 more
        #  instructions per tile: the tensor-core operand then needs register copies of the duplicate rows)
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k_in[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        xt = dot_row_order(xt, BLOCK_M, BLOCK_KP, C)
        if ONE_GROUP_PER_TILE:
            acc += tl.dot(xt, w, input_precision=DOT_PRECISION) * s.to(tl.float32)[None, :]
        else:
            acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)

    # -- one output: directly, or through the workspace by the slice that finishes last. SPLIT_K is a
    #    runtime argument (triton specializes the value 1), so 2..16 slices share one compiled kernel.
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        slice_stride = M * N
        part_ptrs = partial_ptr + offs_m[:, None] * N + offs_n[None, :]  # [BLOCK_M, BLOCK_N] of slice 0
        tl.store(part_ptrs + pid_k * slice_stride, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in range(SPLIT_K):  # slice order: the same sum on every call
                total += tl.load(part_ptrs + i * slice_stride, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed")  # ready for the next call


@functools.cache
def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Split-K arrival counters: zeroed once, reset to zero by the kernel after each use."""
    return torch.zeros(size, device=device, dtype=torch.int32)


def counters_for(device: torch.device, n: int) -> torch.Tensor:
    """The split-K counters for an N-column layer on ``device``, sized for the smallest BLOCK_N and rounded
    up to a power of two so that layers of similar width share one tensor.

    One tensor per device, whatever the stream: a CUDA graph captured on its own stream then uses the
    counters its warm-up call created instead of zeroing new ones inside the graph. So two gemv calls on
    one device must not run concurrently on different streams (gptqlab runs layers one after another).
    """
    return _counters(device, triton.next_power_of_2(triton.cdiv(n, MIN_BLOCK_N)))


def gemv(
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
    """``x[:, perm] @ W + bias`` for decode batches (M <= 16), one kernel launch, output in x.dtype.

    x: [M, K] float16, bfloat16 or float32, M <= 16, any strides, on CUDA (or CPU under TRITON_INTERPRET=1).
    qweight: [K*bits/32, N] int32, codes packed along K (``pack_rows`` layout), bits in {2, 4, 8}; made
        contiguous if it is not (the kernel reads it as int16 halves).
    zeros: [G, N] integer, actual zero points (unpacked, v1 offset applied).
    scales: [G, N] float (fp16 as stored).
    group_size: input rows per group (a multiple of 32 / bits), -1 for one group. Groups must be
        contiguous: row k is in group k // group_size.
    bias: [N] or None.
    perm: [K] int32/int64 or None: act-order; row i of qweight is input perm[i], so x is read as
        x[:, perm] (gathered in the kernel's load).
    config: run this config instead of the autotuned one (benchmarks: ``gpu_check`` sweeps the configs).
    returns: [M, N] in x.dtype, accumulated in fp32; equal to ``reference.matmul`` up to summation order.
    """
    m, n, k, gs = check_launch(x, qweight, zeros, scales, bits, group_size, bias)
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got M={m}; use gemm for larger batches")
    if perm is not None and perm.shape != (k,):
        raise ValueError(f"perm must have shape [K] = [{k}], got {tuple(perm.shape)}")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    halves = qweight.contiguous().view(torch.int16)  # [K*bits/32, 2N]
    workspace = torch.empty((16, m, n), device=x.device, dtype=torch.float32)  # at most SPLIT_K = 16 slices

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel, chosen = _dequant_gemv_kernel, {}
    if config is not None:  # skip the autotuner: its heuristics-wrapped kernel with this config
        kernel, chosen = _dequant_gemv_kernel.fn, config.all_kwargs()
    kernel[grid](
        x,
        perm,
        halves,
        scales,
        zeros,
        None if bias is None else bias.contiguous(),
        out,
        workspace,
        counters_for(x.device, n),
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
        BLOCK_M=BLOCK_M,
        **chosen,
    )
    return out
