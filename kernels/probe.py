"""A load-only probe on the gemv's grid: the memory ceiling of a decode config, measured on the GPU.

``load_probe`` reads the packed words exactly as ``gemv`` does for one config (same grid, tile, split of
K, warps, stages, ``evict_first`` loads of int16 halves) and only XORs them, writing one int32 per
program so the loads cannot be removed. The gemv's time over the probe's time on the same grid is what
dequantization and the dot cost on top of moving the bytes; ``gptqlab.benchmarks.gpu_check`` sweeps
both over the M = 1 and M = 16 configs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_probe_kernel(
    halves_ptr,
    out_ptr,
    N,
    K,
    stride_hk,
    SPLIT_K,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KP * PACK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)
    rows = tl.arange(0, BLOCK_KP)
    cols = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # [2*BLOCK_N] int16 columns
    acc = tl.zeros((BLOCK_KP, 2 * BLOCK_N), dtype=tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_kp = k0 // PACK + rows
        mask = (offs_kp < K // PACK)[:, None] & (cols < 2 * N)[None, :]
        halves = tl.load(
            halves_ptr + offs_kp[:, None] * stride_hk + cols[None, :], mask=mask, other=0, eviction_policy="evict_first"
        )
        acc ^= halves.to(tl.int32)
    tl.store(out_ptr + pid_n * SPLIT_K + pid_k, tl.reduce_or(acc.reshape(BLOCK_KP * 2 * BLOCK_N), 0))


def load_probe(qweight: torch.Tensor, bits: int, config: triton.Config) -> torch.Tensor:
    """Read ``qweight`` [K*bits/32, N] int32 the way ``gemv`` with ``config`` does; returns the per-program
    XOR [programs] int32 (to keep the loads alive)."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    halves = qweight.contiguous().view(torch.int16)
    block_n, split = config.kwargs["BLOCK_N"], config.kwargs["SPLIT_K"]
    out = torch.empty(triton.cdiv(n, block_n) * split, device=qweight.device, dtype=torch.int32)
    _load_probe_kernel[(triton.cdiv(n, block_n), split)](
        halves,
        out,
        n,
        k,
        halves.stride(0),
        split,
        BITS=bits,
        BLOCK_N=block_n,
        BLOCK_KP=config.kwargs["BLOCK_KP"],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
