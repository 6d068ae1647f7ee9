"""Uniform affine quantization primitives: choose (scale, zero), quantize, dequantize.

All functions work on a weight slice ``w`` of shape [N, g] (N output rows, g input columns of one group)
and return per-row parameters of shape [N, 1]. Codes are integers in [0, maxq];
``dequantize(q) = scale * (q - zero)``.
"""

from __future__ import annotations

import torch


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes for ``w`` [N, g] given per-row ``scale``, ``zero`` [N, 1]. Returns float codes in [0, maxq]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Weights represented by codes ``q`` [N, g]."""
    return scale * (q - zero)


def _params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool, min_zero: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # an all-zero row keeps a valid scale
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        same = xmin == xmax
        xmin = torch.where(same, xmin - 1, xmin)
        xmax = torch.where(same, xmax + 1, xmax)
        scale = (xmax - xmin) / maxq
        zero = torch.clamp(torch.round(-xmin / scale), min_zero, maxq)
    # Checkpoints store scales in fp16. Rounding here makes the codes, the error feedback and the saved
    # file agree exactly on the weights they represent.
    # The clamp keeps a group of tiny (or huge) weights from getting a scale that fp16 stores as 0 or inf.
    fp16 = torch.finfo(torch.float16)
    return scale.clamp(fp16.tiny, fp16.max).half().float(), zero


def choose_qparams(
    w: torch.Tensor,
    maxq: int,
    sym: bool,
    min_zero: int = 0,
    mse: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for ``w`` [N, g].

    The range always contains 0, so zero is exactly representable. With ``mse``, the range is shrunk by
    factors in [max_shrink, 1] and the factor with the smallest sum |w - q|^norm is kept per row; this
    clips outliers when that lowers the error.
    """
    w = w.float()
    xmin = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    scale, zero = _params_from_range(xmin, xmax, maxq, sym, min_zero)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        s, z = _params_from_range(p * xmin, p * xmax, maxq, sym, min_zero)
        err = (dequantize(quantize(w, s, z, maxq), s, z) - w).abs_().pow_(norm).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
