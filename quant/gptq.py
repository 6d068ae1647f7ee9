"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), as a pure function of the weight W, the Hessian H and a config.

Notation follows the paper. W is [N, K] (rows are outputs, columns are inputs), H = 2 X X^T is [K, K].
Columns are quantized one at a time; the error of column j, scaled by the inverse Hessian, is fed back
into the columns not yet quantized. Work proceeds in lazy blocks of B columns [i1, i2): updates inside a
block touch only the block, and the rest of W is updated once per block with one matrix product.
"""

from __future__ import annotations

import torch

from gptqlab.quant.config import QuantConfig
from gptqlab.quant.quantizer import choose_qparams, dequantize, quantize
from gptqlab.quant.result import QuantResult, dequantize_codes, weighted_error

MAX_DAMP = 1.0


class NumericalError(ValueError):
    """H stays singular even at the largest dampening."""


def inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)^-1, with λ = damp · mean(diag H).

    Raises λ tenfold per failed factorization, up to ``MAX_DAMP``. Returns (Hinv [K, K], damp used).
    """
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = damp_percent
    while True:
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        if damp >= MAX_DAMP:
            raise NumericalError(f"the Hessian is not positive definite even with damp_percent={damp:g}")
        damp = min(MAX_DAMP, damp * 10)


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """Quantize W [N, K] against the Hessian H [K, K] of its inputs.

    Returns codes, scales, zeros and g_idx in the original column order. With ``cfg.desc_act``, columns
    are processed in order of decreasing diag(H); groups are then formed in that order (g_idx is not
    monotonic) unless ``cfg.static_groups`` fixes them to k // group_size beforehand.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [N, K] and H [K, K]; got W {tuple(W.shape)}, H {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise NumericalError("the Hessian contains NaN or Inf; the layer's inputs are not finite")
    W0 = W.float()
    W = W0.clone()
    H0 = H.float()
    H = H0.clone()
    N, K = W.shape
    gs = cfg.group_size_for(K)
    G = K // gs
    maxq = cfg.maxq

    # Inputs that are always zero carry no information: fix their weights to 0 and keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choose_qparams(w, maxq, cfg.sym, cfg.min_zero, cfg.mse)

    static = [qparams(W[:, g * gs : (g + 1) * gs]) for g in range(G)] if cfg.static_groups else None

    perm = torch.argsort(torch.diag(H), descending=True) if cfg.desc_act else torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv, damp = inverse_hessian_cholesky(H, cfg.damp_percent)

    codes = torch.zeros(N, K, dtype=torch.int32)  # in processing order
    scales = torch.zeros(N, G)
    zeros = torch.zeros(N, G, dtype=torch.int32)
    g_of = torch.zeros(K, dtype=torch.int32)  # group of each column, in processing order
    scale = zero = None
    B = cfg.block_size
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if static is not None:
                g = int(perm[j]) // gs
                scale, zero = static[g]
            else:
                g = j // gs
                if j % gs == 0:  # a new group: its parameters come from the current, updated weights
                    cols = torch.cat([W1[:, i:], W[:, i2 : j + gs]], dim=1)[:, :gs]
                    scale, zero = qparams(cols)
                    scales[:, g] = scale[:, 0]
                    zeros[:, g] = zero[:, 0].to(torch.int32)
            w = W1[:, i : i + 1]  # [N, 1]
            d = Hinv1[i, i]
            q = quantize(w, scale, zero, maxq)
            codes[:, j] = q[:, 0].to(torch.int32)
            g_of[j] = g
            err = (w - dequantize(q, scale, zero)) / d  # [N, 1]
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static is not None:
        for g, (s, z) in enumerate(static):
            scales[:, g] = s[:, 0]
            zeros[:, g] = z[:, 0].to(torch.int32)
    inv = torch.argsort(perm)
    codes = codes[:, inv].contiguous()
    g_idx = g_of[inv].contiguous()
    Q = dequantize_codes(codes, scales, zeros, g_idx)
    return QuantResult(codes, scales, zeros, g_idx, Q, weighted_error(W0, Q, H0), damp)
