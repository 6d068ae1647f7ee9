"""What a quantizer returns for one weight matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantResult:
    """Quantized form of a weight W [N, K] (torch Linear layout: N outputs, K inputs).

    codes: [N, K] int32 in [0, 2**bits), in the original input-channel order.
    scales: [N, G] float32, one per output row and group.
    zeros: [N, G] int32, the actual zero point z (not z - 1).
    g_idx: [K] int32, the group of each input channel.
    Q: [N, K] float32, the dequantized weight scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]]).
    loss: Hessian-weighted squared error tr((W - Q) H (W - Q)^T), or None when no Hessian was given.
    damp_percent: the dampening that was actually used (may be raised from the configured value).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    Q: torch.Tensor
    loss: float | None = None
    damp_percent: float | None = None


def weighted_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer-output error ||(W - Q) X||^2 up to H's scaling. W, Q [N, K]; H [K, K]."""
    D = W.double() - Q.double()
    return float(((D @ H.double()) * D).sum())


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """Q [N, K] from codes [N, K], scales/zeros [N, G] and g_idx [K]."""
    g = g_idx.long()
    return scales[:, g].float() * (codes.float() - zeros[:, g].float())
