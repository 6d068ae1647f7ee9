"""GPTQ dequant-matmul: a dispatcher over Triton kernels (gemv for decode, gemm for prefill) and a torch
reference, for layers in the GPTQ layout.

On the CPU, ``gptq_matmul`` runs the reference. The fast CPU path, torch's int4 kernel
(:mod:`gptqlab.kernels.cpu`), needs the weights repacked once at load time, so it is chosen by
``QuantLinear.use_cpu_kernel`` (``gptqlab.load(device="cpu")`` with backend "auto"), not here.

The operand layout is described once, in :mod:`gptqlab.kernels.layout`. Triton is imported only when a
Triton kernel runs, so this package imports without it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Literal

import torch

from gptqlab.kernels import reference
from gptqlab.kernels.layout import GEMV_MAX_M, KERNEL_BITS, check_operands

__all__ = ["BACKENDS", "backend_for", "gptq_matmul", "kernel_for"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
"""auto: Triton on CUDA when it has a kernel for the layer, else torch (on the CPU, QuantLinear runs its
layers repacked for the int4 kernel of :mod:`gptqlab.kernels.cpu` instead; ``gptq_matmul`` never picks it).
triton: Triton or an error (CPU needs TRITON_INTERPRET=1), with the torch fallback for layers without a
kernel. torch: the reference (exact; on a repacked CPU layer, the weight the int4 kernel represents)."""


@functools.cache
def _note_fallback(reason: str) -> None:
    """Log each reason for a torch fallback once per process."""
    logger.info("gptqlab.kernels: %s; using the torch reference (correct, but dequantizes each call)", reason)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(
    bits: int,
    device: torch.device | str,
    backend: str = "auto",
    group_size: int = 128,
) -> Literal["triton", "torch"]:
    """Which implementation ``gptq_matmul`` uses for a layer of ``bits`` on ``device``.

    Layers the kernels cannot take go to the torch reference, and the reason is logged once:
    3-bit weights (their codes straddle int32 words; there is no Triton kernel) and group sizes that are
    not a multiple of 32 / bits. Raises ValueError when ``backend="triton"`` cannot run at all.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if bits not in KERNEL_BITS:
        _note_fallback(f"no Triton kernel for {bits}-bit weights (kernels: {KERNEL_BITS} bits)")
        return "torch"
    if group_size != -1 and group_size % (32 // bits):
        _note_fallback(f"group_size {group_size} is not a multiple of {32 // bits}, the codes per {bits}-bit word")
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and _triton_installed() else "torch"
    if not _triton_installed():
        raise ValueError("backend='triton' needs triton: pip install 'gptqlab[triton]', or use backend='torch'")
    if not on_cuda:
        from gptqlab.kernels.common import interpreting

        if not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got {device}; use backend='torch' or 'auto', or set "
                "TRITON_INTERPRET=1 before triton is imported to run the kernels in the CPU interpreter"
            )
    return "triton"


def kernel_for(m: int) -> Literal["gemv", "gemm"]:
    """The Triton kernel for ``m`` rows of activations: split-K gemv up to 16 rows, tiled gemm above."""
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[..., perm] @ W + bias`` for a GPTQ layer in the layout of :mod:`gptqlab.kernels.layout`.

    x: [..., K] float16, bfloat16 or float32; the leading dims are flattened to M rows.
    qweight: [K*bits/32, N] int32 (``pack_rows`` layout); bits in {2, 3, 4, 8}.
    zeros: [G, N] integer actual zero points; scales: [G, N] float; G = ceil(K / group_size).
    group_size: rows per group, -1 for one group; groups are contiguous (row k in group k // group_size).
    bias: [N] or None.
    backend: "auto", "triton" or "torch", see :func:`backend_for`.
    perm: [K] integer or None: act-order checkpoints reordered at load time (row i of qweight is input
        perm[i]). The Triton kernels gather x through it in their loads (no extra launch); the torch path
        does ``x.index_select(-1, perm)``.
    returns: [..., N] in x.dtype. Launches one kernel per call on CUDA (the Triton path).
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    m, n, _ = check_operands(x2, qweight, zeros, scales, bits, group_size, bias)
    if perm is not None and perm.shape != (k,):
        raise ValueError(f"perm must have shape [K] = [{k}], got {tuple(perm.shape)}")
    if backend_for(bits, x.device, backend, group_size) == "torch":
        if perm is not None:
            x2 = x2.index_select(-1, perm)
        out = reference.matmul_contiguous(x2, qweight, zeros, scales, bits, group_size, bias)
    elif kernel_for(m) == "gemv":
        from gptqlab.kernels.gemv import gemv

        out = gemv(x2, qweight, zeros, scales, bits, group_size, bias, perm)
    else:
        from gptqlab.kernels.gemm import gemm

        out = gemm(x2, qweight, zeros, scales, bits, group_size, bias, perm)
    return out.reshape(*x.shape[:-1], n)
