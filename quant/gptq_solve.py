"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), as a pure function of the weight W, the Hessian H and a config.

Notation follows the paper. W is [N, K] (rows are outputs, columns are inputs), H = 2 X X^T is [K, K],
and U is the upper Cholesky factor of H^-1 (Uᵀ U = H^-1). Columns are quantized one at a time; the error
of column j, divided by U[j, j], is fed back into the columns not yet quantized through row j of U. Work
proceeds in lazy blocks of B columns [i1, i2): the rest of W is updated once per block with one matrix
product. Inside a block the same trick is applied once more, on chunks of at most ``INNER_BLOCK``
columns: a column's error touches only the rest of its chunk, and the rest of the block is updated with
one small matrix product per chunk.

U is never formed. With J the order reversal and J (H + λI) J = L Lᵀ (L lower), U = J L^-1 J, so the
rows U[i1:i2] that a block needs are one triangular solve against the leading part of L
(:meth:`HessianFactor.rows`). Cost per Linear (N outputs, K inputs, chunk b), in multiply-adds: K³/6 for
the Cholesky factorization, about K³/6 for the triangular solves, N·K² for the block updates (matrix
products), N·K·b/2 for the rank-1 updates, and about a dozen elementwise kernels of N values per column.
Memory: L and a K x B block of U beyond W, Q and H. Every tensor lives on W's device and nothing is read
back to the host inside the column loop; ``python -m gptqlab.benchmarks.quantize_7b_layers --solve``
times it against :func:`gptq_reference`.

Group parameters. The paper fixes a group's scale and zero when the group is first needed. The
reference implementation (IST-DASLab/gptq, transcribed in :func:`gptq_reference`; GPTQModel does the
same) reads them from W as it was at the start of the lazy block, so a group that starts inside a block
lacks the feedback of the block's earlier columns ("stale" parameters). gptqlab keeps the reference's
choice, computing all of a block's groups in one call. The alternative ("fresh": parameters from the
fully updated columns) was measured on correlated 512-input problems (3 seeds, B = 128): 0.8–2.9 % higher
Hessian-weighted error at 3 bits g32, 0.7–4.7 % at 2 bits g32, within ±0.5 % at 4 bits g64, and 0.5–0.9 %
lower with act-order at 4 bits g32; with the group size a divisor of a multiple of B (g128, B = 128) the
two are the same. ``tests/quant/test_reference.py`` checks that :func:`gptq` matches the reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch

from gptqlab.quant.config import QuantConfig
from gptqlab.quant.quantizer import choose_qparams, dequantize, quantize
from gptqlab.quant.result import QuantResult, dequantize_codes

MAX_DAMP = 1.0
# Width of the inner chunks whose columns are updated one rank-1 product at a time: smaller chunks move
# less memory per column, larger ones launch fewer small matrix products. 16 was the fastest of 8/16/32/128
# on a 2-core CPU for K = 1024 … 4096 (python -m gptqlab.benchmarks.quantize_7b_layers --solve).
INNER_BLOCK = 16


class NumericalError(ValueError):
    """H stays singular even at the largest dampening."""


@dataclass
class HessianFactor:
    """What GPTQ needs from H for one column order; it depends on H, ``desc_act`` and the dampening only,
    so Linears that share their input (q/k/v, gate/up) can share it.

    perm: [K] int64, the processing order (columns by decreasing diag(H) with act-order, else 0..K-1).
    L: [K, K] lower Cholesky factor of J P (H + λI) Pᵀ J, J the order reversal, P the permutation;
        column-major (``L.mT`` is contiguous).
    damp: the dampening used, as a fraction of mean(diag H) (raised from the configured one on failure).
    lam: λ = damp · mean(diag H), a 0-dim float64 tensor on H's device.
    dead: [K] bool, inputs whose diag(H) is 0 (always zero); their weights are quantized as 0.
    """

    perm: torch.Tensor
    L: torch.Tensor
    damp: float
    lam: torch.Tensor
    dead: torch.Tensor

    def rows(self, i1: int, i2: int) -> torch.Tensor:
        """U[i1:i2, i1:] ([i2 - i1, K - i1], in processing order), where Uᵀ U = (P (H + λI) Pᵀ)^-1.

        Rows K-i2 … K-i1 of L^-1 are X with X L = I[rows]; they vanish beyond column m = K - i1, so one
        triangular solve against L[:m, :m] gives them (m²·(i2 - i1)/2 multiply-adds).
        """
        K, b = self.L.shape[0], i2 - i1
        m = K - i1
        E = torch.zeros(b, m, dtype=self.L.dtype, device=self.L.device)
        E[:, m - b :].fill_diagonal_(1)
        # L is column-major, so its leading part is a matrix LAPACK reads without a copy.
        X = torch.linalg.solve_triangular(self.L[:m, :m], E, upper=False, left=False)
        return X.flip(0, 1)


def hessian_factor(H: torch.Tensor, damp_percent: float, desc_act: bool = False) -> HessianFactor:
    """Factor H [K, K] (left unchanged) for :func:`gptq`. Raises λ tenfold per failed factorization, up to
    ``MAX_DAMP``; raises NumericalError when even that fails. Memory: one K x K matrix beyond H (two
    for a moment with act-order), factored in place."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be [K, K], got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise NumericalError("the Hessian contains NaN or Inf; the layer's inputs are not finite")
    H = H.float()
    K = H.shape[0]
    diag = H.diagonal()
    dead = diag == 0
    if desc_act:
        perm = torch.argsort(diag, descending=True, stable=True)
    else:
        perm = torch.arange(K, device=H.device)
    mean_diag = diag.masked_fill(dead, 1).mean(dtype=torch.float64)  # dead inputs count as diag 1
    order = perm.flip(0)
    damp = damp_percent
    while True:
        A = H.index_select(0, order).index_select(1, order) if desc_act else H.flip(0, 1)  # J P H Pᵀ J
        A.diagonal().masked_fill_(dead[order], 1)  # keeps H invertible; the weights of dead inputs are 0
        lam = damp * mean_diag
        A.diagonal().add_(lam.to(A.dtype))
        # Factor in place through the column-major view A.mT (the same matrix, A is symmetric): given a
        # row-major matrix, LAPACK would first copy it. L is then column-major.
        A = A.mT
        L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32, device=H.device)))
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return HessianFactor(perm, L, damp, lam, dead)
        if damp >= MAX_DAMP:
            raise NumericalError(f"the Hessian is not positive definite even with damp_percent={damp:g}")
        damp = min(MAX_DAMP, damp * 10)


def inverse_hessian_cholesky(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)^-1 ([K, K], the whole matrix) and the dampening used."""
    f = hessian_factor(H, damp_percent)
    return f.rows(0, H.shape[0]), f.damp


def _chunks(i1: int, i2: int, b: int, gs: int) -> list[tuple[int, int]]:
    """[c1, c2) pieces of the block [i1, i2) of width <= b that never cross a group start."""
    cuts = sorted({*range(i1, i2, b), *range(-(-i1 // gs) * gs, i2, gs), i2})
    return list(pairwise(cuts))


def gptq(
    W: torch.Tensor,
    H: torch.Tensor | None,
    cfg: QuantConfig,
    factor: HessianFactor | None = None,
    inner_block: int = INNER_BLOCK,
) -> QuantResult:
    """Quantize W [N, K] against the Hessian H [K, K] of its inputs. W and H are left unchanged.

    factor: ``hessian_factor(H, cfg.damp_percent, cfg.desc_act)``, computed here when not given; with it,
        H may be None (the caller can free H once it is factored).
    Returns codes, scales, zeros and g_idx in the original column order, on W's device. With
    ``cfg.desc_act``, columns are processed in order of decreasing diag(H); groups are then formed in that
    order (g_idx is not monotonic) unless ``cfg.static_groups`` fixes them to k // group_size beforehand.
    """
    if H is None and factor is None:
        raise ValueError("gptq needs the Hessian H or its factor")
    shape = tuple(H.shape) if H is not None else tuple(factor.L.shape)
    if W.dim() != 2 or shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [N, K] and H [K, K]; got W {tuple(W.shape)}, H {shape}")
    if inner_block <= 0:
        raise ValueError(f"inner_block must be positive, got {inner_block}")
    if factor is None:
        factor = hessian_factor(H, cfg.damp_percent, cfg.desc_act)
    dev = W.device
    N, K = W.shape
    gs = cfg.group_size_for(K)
    G = K // gs
    maxq = cfg.maxq
    perm, dead = factor.perm, factor.dead

    def qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choose_qparams(w, maxq, cfg.sym, cfg.min_zero, cfg.mse)

    # Working copy in processing order, transposed so that a column of W is a contiguous row: Wt [K, N].
    if cfg.desc_act:
        Wt = W.t().index_select(0, perm).float()
        Wt.masked_fill_(dead.index_select(0, perm)[:, None], 0)
    else:
        Wt = torch.empty(K, N, device=dev)
        Wt.copy_(W.t()).masked_fill_(dead[:, None], 0)
    codes_t = torch.empty(K, N, dtype=torch.uint8, device=dev)  # codes, processing order
    scales_t = torch.empty(G, N, device=dev)  # one row per group
    zeros_t = torch.empty(G, N, device=dev)
    if cfg.static_groups:
        # Every group's parameters from the unchanged weights, all groups in one call.
        Wg = W.float().masked_fill(dead, 0).reshape(N, G, gs).transpose(0, 1).reshape(G * N, gs)
        s, z = qparams(Wg)
        scales_t.copy_(s.reshape(G, N))
        zeros_t.copy_(z.reshape(G, N))
        col_group = perm // gs  # group of each processed column
    else:
        col_group = torch.arange(K, device=dev) // gs

    err_sq = torch.zeros((), dtype=torch.float64, device=dev)  # Σ ||err_j||², for the loss below
    B = cfg.block_size
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        U = factor.rows(i1, i2)  # U[i1:i2, i1:], column c at c - i1
        Err = torch.empty(i2 - i1, N, device=dev)  # scaled errors of the block's columns
        first = -(-i1 // gs) * gs  # the groups that start in this block: first, first + gs, ... < i2
        if not cfg.static_groups and first < i2:
            # Their parameters, all in one call, from W as it is at the start of the block ("stale", as
            # the reference does; see the module docstring).
            ng = -(-(i2 - first) // gs)
            Wg = Wt[first : first + ng * gs].reshape(ng, gs, N).transpose(1, 2).reshape(ng * N, gs)
            s, z = qparams(Wg)
            scales_t[first // gs : first // gs + ng] = s.reshape(ng, N)
            zeros_t[first // gs : first // gs + ng] = z.reshape(ng, N)
        with _small_ops(dev):
            _solve_block(Wt, codes_t, Err, U, i1, i2, gs, inner_block, scales_t, zeros_t, col_group, cfg)
        if i2 < K:
            Wt[i2:].addmm_(U[:, i2 - i1 :].t(), Err, alpha=-1)
        err_sq += Err.square().sum(dtype=torch.float64)
        del U, Err

    # Wt now holds the dequantized weights (each column was overwritten once it was quantized).
    inv = torch.argsort(perm)
    codes = (codes_t.index_select(0, inv) if cfg.desc_act else codes_t).t().contiguous()
    del codes_t
    Q = (Wt.index_select(0, inv) if cfg.desc_act else Wt).t().contiguous()
    del Wt
    g_idx = (col_group.index_select(0, inv) if cfg.desc_act else col_group).to(torch.int32)
    scales = scales_t.t().contiguous()
    zeros = zeros_t.t().to(torch.int32).contiguous()
    # The loss without another N·K² product: the updates make W - Q = Err U (processing order) and
    # U (H + λI) Uᵀ = I, so tr((W - Q)(H + λI)(W - Q)ᵀ) = Σ ||err_j||². Dead inputs add nothing (their rows
    # of H are 0 and their W - Q is 0). Equals weighted_error to float32 rounding (tests/quant/).
    d_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for r in range(0, N, 1024):  # ||W - Q||², a row chunk at a time
        d_sq += (W[r : r + 1024].float().masked_fill(dead, 0) - Q[r : r + 1024]).square().sum(dtype=torch.float64)
    loss = float(err_sq - factor.lam * d_sq)
    return QuantResult(codes, scales, zeros, g_idx, Q, loss, factor.damp)


def _solve_block(Wt, codes_t, Err, U, i1: int, i2: int, gs: int, inner_block: int, scales_t, zeros_t, col_group, cfg):
    """Quantize the columns [i1, i2) of Wt [K, N] in place: codes into codes_t [K, N] (uint8), scaled errors
    into Err [i2 - i1, N], and each quantized column of Wt replaced by its dequantized value (the algorithm
    never reads it again). U is U[i1:i2, i1:]; scales_t, zeros_t [G, N]; col_group [K]. Columns past i2 are
    not touched."""
    N = Wt.shape[1]
    chunks = _chunks(i1, i2, inner_block, gs)
    for c1, c2 in chunks:
        a1, a2 = c1 - i1, c2 - i1  # the chunk, relative to the block
        if cfg.static_groups:
            S, Z = scales_t[col_group[c1:c2]], zeros_t[col_group[c1:c2]]  # [c, N]
        else:
            S, Z = scales_t[c1 // gs].expand(c2 - c1, N), zeros_t[c1 // gs].expand(c2 - c1, N)
        for j in range(a1, a2):
            w = Wt[i1 + j]  # [N], with the feedback of every earlier column
            q = quantize(w, S[j - a1], Z[j - a1], cfg.maxq)
            codes_t[i1 + j] = q
            dq = dequantize(q, S[j - a1], Z[j - a1])
            e = Err[j]
            torch.sub(w, dq, out=e)
            e.div_(U[j, j])
            w.copy_(dq)
            if j + 1 < a2:
                Wt[i1 + j + 1 : c2].addr_(U[j, j + 1 : a2], e, alpha=-1)
        if a2 < i2 - i1:
            Wt[c2:i2].addmm_(U[a1:a2, a2 : i2 - i1].t(), Err[a1:a2], alpha=-1)


@contextmanager
def _small_ops(device: torch.device):
    """One CPU thread for the column loop: its kernels touch a few thousand values each, and with two
    OpenMP threads on a shared 2-core CPU they were 10x slower (2.2 s vs 0.2 s for a 768-input Linear),
    as every kernel waits at a barrier for a thread the scheduler has paused. Matrix products outside
    the loop keep torch's thread count. No effect on other devices."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_reference(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """A line-by-line transcription of the reference implementation (IST-DASLab/gptq ``fasterquant``):
    explicit H^-1 and its Cholesky factor, one column at a time inside lazy blocks of ``cfg.block_size``,
    group parameters from W as it was at the start of the block ("stale"), fixed dampening.

    The baseline for tests and benchmarks; not used by the driver. Same arguments and result as :func:`gptq`
    (loss: :func:`weighted_error`).
    """
    from gptqlab.quant.result import weighted_error

    W0, H0 = W, H
    W, H = W.float().clone(), H.float().clone()
    N, K = W.shape
    gs = cfg.group_size_for(K)
    maxq = cfg.maxq
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    def find_params(w):
        return choose_qparams(w, maxq, cfg.sym, cfg.min_zero, cfg.mse)

    groups = [find_params(W[:, g * gs : (g + 1) * gs]) for g in range(K // gs)] if cfg.static_groups else None
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if cfg.desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp_percent * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Qc = torch.zeros(N, K)  # codes, processing order
    scales, zeros = torch.zeros(N, K // gs), torch.zeros(N, K // gs, dtype=torch.int32)
    g_of = torch.zeros(K, dtype=torch.int32)
    scale = zero = None
    for i1 in range(0, K, cfg.block_size):
        i2 = min(i1 + cfg.block_size, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = int(perm[j]) // gs if cfg.static_groups else j // gs
            if cfg.static_groups:
                scale, zero = groups[g]
            elif j % gs == 0:
                scale, zero = find_params(W[:, j : j + gs])  # W, not W1: stale within the block
            scales[:, g], zeros[:, g], g_of[j] = scale[:, 0], zero[:, 0].to(torch.int32), g
            w, d = W1[:, i : i + 1], Hinv1[i, i]
            q = quantize(w, scale, zero, maxq)
            Qc[:, j] = q[:, 0]
            err = (w - dequantize(q, scale, zero)) / d
            W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
            Err1[:, i : i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    codes, g_idx = Qc[:, inv].to(torch.uint8), g_of[inv]
    Q = dequantize_codes(codes, scales, zeros, g_idx)
    return QuantResult(codes, scales, zeros, g_idx, Q, weighted_error(W0, Q, H0), cfg.damp_percent)
