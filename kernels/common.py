"""Pieces shared by the Triton kernel families: launch checks, numerics helpers and autotuning helpers.

Importing this module imports triton. ``gptqlab.kernels`` imports it only when a Triton kernel runs, so
``import gptqlab`` works without triton installed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gptqlab.kernels.layout import KERNEL_BITS, X_DTYPES, check_operands, resolve_group_size

FLOAT_BIAS = tl.constexpr(8388608.0)
"""2**23 as fp32."""
FLOAT_BIAS_BITS = tl.constexpr(0x4B000000)
"""The fp32 bit pattern of 2**23: the word ``FLOAT_BIAS_BITS | q`` read as fp32 is exactly 2**23 + q for
0 <= q < 2**23."""


def interpreting() -> bool:
    """True when TRITON_INTERPRET selects triton's CPU interpreter (then the kernels use one large config)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def m_bucket(m: int) -> int:
    """The autotune key for M: the next power of two, capped at 4096.

    Keying on M itself would re-tune for every new prefill length; one tuning per power of two is enough
    because the best tile depends on M only through how many row blocks there are.
    """
    return min(triton.next_power_of_2(m), 4096)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot; fp16 and bf16 operands ignore it.

    fp32 activations use "tf32x3" (three tensor-core products of split operands): a dequantized weight
    has at most 20 significant bits and is split exactly, x keeps 22 of its 24 bits, so results are
    within ~1e-6 relative of fp32, where plain tf32 would be off by ~1e-3. "ieee" would be exact but
    runs on FMA units and spills registers at these tiles.
    """
    return "tf32x3" if dtype == torch.float32 else "tf32"


def tile_in_one_group(block_k: int, group_size: int, k: int) -> bool:
    """True when no K tile of ``block_k`` rows (tiles start at multiples of ``block_k``) straddles a group.

    Then each tile needs one [BLOCK_N] row of scales and zeros instead of a per-row gather.
    """
    return group_size % block_k == 0 or group_size >= k


@triton.jit
def bias_zeros(zeros):
    """fp32 ``z + 2**23`` for integer zero points (exact for z < 2**23): subtracting it from the fp32 word
    ``FLOAT_BIAS_BITS | q`` gives q - z without an I2F conversion (``dequant.dequantize_halves_exact``)."""
    return zeros.to(tl.float32) + FLOAT_BIAS


def check_launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple[int, int, int, int]:
    """Validate the operands of a Triton launch; return (M, N, K, group size in rows). Raises ValueError
    saying what to change."""
    m, n, k = check_operands(x, qweight, zeros, scales, bits, group_size, bias)
    if bits not in KERNEL_BITS:
        raise ValueError(
            f"no Triton kernel for {bits}-bit weights (kernels exist for {KERNEL_BITS}); "
            "call gptqlab.kernels.gptq_matmul, which falls back to the torch reference"
        )
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if not x.is_cuda and not interpreting():
        raise ValueError(
            f"Triton kernels need CUDA tensors, got {x.device}; use backend='torch', or set TRITON_INTERPRET=1 "
            "before triton is imported to run them in the (slow) CPU interpreter"
        )
    gs = resolve_group_size(group_size, k)
    if gs % (32 // bits):
        raise ValueError(
            f"the Triton kernels need group_size to be a multiple of {32 // bits} (the codes of one {bits}-bit "
            f"word must share a group), got {group_size}; use the torch reference"
        )
    return m, n, k, gs
