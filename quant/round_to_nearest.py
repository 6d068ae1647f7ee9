"""Round-to-nearest: each group is quantized on its own, with no error feedback. The baseline for GPTQ."""

from __future__ import annotations

import torch

from gptqlab.quant.config import QuantConfig
from gptqlab.quant.quantizer import choose_qparams, quantize
from gptqlab.quant.result import QuantResult, dequantize_codes, weighted_error


def rtn(W: torch.Tensor, cfg: QuantConfig, H: torch.Tensor | None = None) -> QuantResult:
    """Quantize W [N, K] group by group. H [K, K], if given, is only used to report the weighted loss."""
    W = W.float()
    N, K = W.shape
    gs = cfg.group_size_for(K)
    G = K // gs
    Wg = W.reshape(N, G, gs).transpose(0, 1).reshape(G * N, gs)  # rows of every group stacked: [G*N, gs]
    scale, zero = choose_qparams(Wg, cfg.maxq, cfg.sym, cfg.min_zero, cfg.mse)
    codes = quantize(Wg, scale, zero, cfg.maxq)
    codes = codes.reshape(G, N, gs).transpose(0, 1).reshape(N, K).to(torch.uint8)
    scales = scale.reshape(G, N).t().contiguous()
    zeros = zero.reshape(G, N).t().contiguous().to(torch.int32)
    g_idx = torch.arange(K, dtype=torch.int32, device=W.device) // gs
    Q = dequantize_codes(codes, scales, zeros, g_idx)
    loss = weighted_error(W, Q, H) if H is not None else None
    return QuantResult(codes, scales, zeros, g_idx, Q, loss)
