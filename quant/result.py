"""What a quantizer returns for one weight matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantResult:
    """Quantized form of a weight W [N, K] (torch Linear layout: N outputs, K inputs).

    codes: [N, K] integers in [0, 2**bits), in the original input-channel order; uint8 from the quantizers
        (a quarter of int32's memory), int32 when read back from a checkpoint.
    scales: [N, G] float32, one per output row and group.
    zeros: [N, G] int32, the actual zero point z (not z - 1).
    g_idx: [K] int32, the group of each input channel.
    Q: [N, K] float32, the dequantized weight scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]]), or
        None once a caller has dropped it to save memory (:func:`dequantize_codes` recomputes it).
    All tensors are on the device of the weight that was quantized.
    loss: Hessian-weighted squared error tr((W - Q) H (W - Q)^T), or None when no Hessian was given.
    damp_percent: the dampening that was actually used (may be raised from the configured value).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    Q: torch.Tensor | None
    loss: float | None = None
    damp_percent: float | None = None


def weighted_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> float:
    """tr((W - Q) H (W - Q)^T): the layer-output error ||(W - Q) X||^2 up to H's scaling. W, Q [N, K]; H [K, K].

    Float32 products over ``rows`` rows at a time (memory: rows x K beyond the inputs), summed in float64.
    """
    H = H.float()
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for r in range(0, W.shape[0], rows):
        D = W[r : r + rows].float() - Q[r : r + rows].float()
        total += ((D @ H) * D).sum(dtype=torch.float64)
    return float(total)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Q [N, K] from codes [N, K], scales/zeros [N, G] and g_idx [K]."""
    g = g_idx.long()
    return scales[:, g].float() * (codes.float() - zeros[:, g].float())
