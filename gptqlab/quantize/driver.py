"""The layer-wise driver: runs calibration data through a model one decoder block at a time and quantizes
each block's Linears with GPTQ or RTN.

1. Capture the inputs of the first block (the embeddings run once; the block list is swapped for a
   catcher that records its arguments and stops the forward pass).
2. For each block: bring only that block onto the device, collect a Hessian H = 2/T Σ x xᵀ per Linear
   with forward hooks, quantize stage by stage (true-sequential), put the dequantized weights back, re-run
   the block to make the next block's inputs, hand the results to ``on_block``, and release the block.

A run can resume at any block: given that block's inputs (the outputs ``on_block`` received for the block
before it), step 1 runs on one sample only, to recompute the block keyword arguments, and the results are
bit for bit those of an uninterrupted run.

The algorithm itself lives in :mod:`gptqlab.quant`; this module knows models, not number formats.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gptqlab.arch import Arch, arch_for, block_list
from gptqlab.errors import GptqlabError
from gptqlab.modelfiles import SafetensorsWeights, materialize, release
from gptqlab.quant import NumericalError, QuantConfig, QuantResult, dequantize_codes, gptq, rtn

log = logging.getLogger("gptqlab")

METHODS = ("gptq", "rtn")


@dataclass
class LayerReport:
    """One quantized Linear: its name, shape, Hessian-weighted loss, time and the dampening used."""

    name: str
    in_features: int
    out_features: int
    loss: float
    seconds: float
    damp_percent: float | None


@dataclass
class QuantizedLinear:
    """What a sink receives for each Linear: the quantizer's result, the Linear's bias (or None) and the
    Linear's report (also among those that :func:`quantize_model` returns)."""

    result: QuantResult
    bias: torch.Tensor | None
    report: LayerReport


class HessianAccumulator:
    """Running H = 2/T Σ_t x_t x_tᵀ over all T tokens seen, in float32. x: [..., K]."""

    def __init__(self, K: int, device: torch.device):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [T, K]
        t = x.shape[0]
        self.H *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = x * math.sqrt(2 / self.tokens)
        self.H += x.T @ x


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass once the first block's inputs are recorded."""


class _Catcher(nn.Module):
    def __init__(self, store: list, kwargs_out: dict):
        super().__init__()
        self.store = store
        self.kwargs_out = kwargs_out

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append(hidden_states)
        if not self.kwargs_out:
            self.kwargs_out.update(kwargs)
        raise _Captured


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: Arch, input_ids: torch.Tensor, device: torch.device) -> tuple[list, dict]:
    """Inputs of the first decoder block for each calibration sample, and the keyword arguments the model
    passes to its blocks (masks, rotary embeddings, ALiBi), recorded from the first sample.

    input_ids: [nsamples, seqlen]. Returns ([hidden [1, seqlen, hidden_size]] * nsamples, kwargs).
    """
    parent_path, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    store: list = []
    kwargs: dict = {}
    setattr(parent, attr, nn.ModuleList([_Catcher(store, kwargs)]))
    try:
        model.to(device)
        for j in range(input_ids.shape[0]):
            try:
                model(input_ids[j : j + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        model.to("cpu")  # before the blocks come back: they may hold meta parameters
        setattr(parent, attr, blocks)
    kwargs.pop("past_key_values", None)
    kwargs.pop("layer_past", None)
    kwargs["use_cache"] = False
    return store, kwargs


def _run_block(block: nn.Module, inputs: list, kwargs: dict) -> list:
    return [_first(block(x, **kwargs)) for x in inputs]


def _quantize_weight(name: str, W: torch.Tensor, H: torch.Tensor | None, qcfg: QuantConfig, method: str) -> QuantResult:
    if not torch.isfinite(W).all():
        raise GptqlabError(f"layer {name}: the weights contain NaN or Inf; the checkpoint is damaged")
    try:
        res = gptq(W, H, qcfg) if method == "gptq" else rtn(W, qcfg, H)
    except NumericalError as exc:
        # diag(H)[k] = 2 · mean of x_k², so this is the RMS of the loudest input channel.
        rms = float(torch.sqrt(torch.diag(H).max() / 2)) if H is not None else float("nan")
        raise GptqlabError(
            f"layer {name}: {exc}; its loudest input channel has RMS {rms:.3g}, so check the weights that feed "
            "this layer (e.g. a norm) and the calibration data"
        ) from exc
    if res.damp_percent is not None and res.damp_percent != qcfg.damp_percent:
        log.warning("layer %s: Cholesky failed, damp_percent raised %g → %g", name, qcfg.damp_percent, res.damp_percent)
    return res


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    qcfg: QuantConfig,
    method: str = "gptq",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: SafetensorsWeights | None = None,
    on_block: Callable[[int, nn.Module, dict[str, QuantizedLinear], list[torch.Tensor]], None] | None = None,
    progress: bool = True,
    start: int = 0,
    inputs: list[torch.Tensor] | None = None,
) -> list[LayerReport]:
    """Quantize every decoder-block Linear of ``model`` in place, block by block.

    model: a transformers causal LM. With ``weights`` given, its blocks hold meta parameters and each block
        is loaded from ``weights`` when its turn comes, then released (peak memory: one block). Without,
        the model is fully loaded and each quantized Linear keeps its dequantized weight (fake-quant), so
        the returned model can be evaluated directly.
    input_ids: [nsamples, seqlen] calibration tokens.
    on_block(i, block, {linear name: QuantizedLinear}, outputs): called after block i while its weights are
        still loaded, e.g. to pack and store it. outputs: block i's outputs for every sample
        ([hidden [1, seqlen, hidden_size]] * nsamples, on ``device``), which are block i+1's inputs.
    start, inputs: resume at block ``start`` (0 < start <= number of blocks) with ``inputs``, the outputs
        that on_block received for block start-1. Blocks before ``start`` are left untouched.
    Returns one LayerReport per Linear of the blocks it quantized, in block order.
    """
    if method not in METHODS:
        raise GptqlabError(f"unknown method {method!r}; choose gptq or rtn")
    device = torch.device(device)
    arch = arch_for(model)
    blocks = block_list(model, arch)
    if start:
        if inputs is None or not 0 < start <= len(blocks):
            raise ValueError(f"resuming at block {start} of {len(blocks)} needs that block's inputs")
        _, kwargs = capture_inputs(model, arch, input_ids[:1], device)  # the kwargs come from sample 0
        inputs = [x.to(device) for x in inputs]
    else:
        inputs, kwargs = capture_inputs(model, arch, input_ids, device)
    reports: list[LayerReport] = []
    stages = arch.stages if qcfg.true_sequential else (arch.linears,)
    bar = tqdm(
        range(start, len(blocks)),
        desc=f"{method} {qcfg.bits}-bit",
        unit="block",
        initial=start,
        total=len(blocks),
        disable=not progress,
    )
    for i in bar:
        block = blocks[i]
        prefix = f"{arch.blocks}.{i}"
        if weights is not None:
            materialize(block, prefix, weights, device, dtype)
        else:
            block.to(device=device, dtype=dtype)
        modules = dict(block.named_modules())
        done: dict[str, QuantizedLinear] = {}
        for stage in stages:
            acc = {n: HessianAccumulator(modules[n].in_features, device) for n in stage}
            hooks = [modules[n].register_forward_hook(lambda _m, args, _out, a=acc[n]: a.add(args[0])) for n in stage]
            try:
                _run_block(block, inputs, kwargs)  # RTN does not need H, but it reports the same loss
            finally:
                for h in hooks:
                    h.remove()
            for n in stage:
                lin = modules[n]
                t0 = time.perf_counter()
                res = _quantize_weight(f"{prefix}.{n}", lin.weight.data, acc[n].H, qcfg, method)
                seconds = time.perf_counter() - t0
                lin.weight.data = res.Q.to(device=lin.weight.device, dtype=lin.weight.dtype)
                bias = None if lin.bias is None else lin.bias.data.detach().to("cpu")
                loss = res.loss if res.loss is not None else float("nan")
                report = LayerReport(
                    f"{prefix}.{n}", lin.in_features, lin.out_features, loss, seconds, res.damp_percent
                )
                done[n] = QuantizedLinear(_to_cpu(res), bias, report)
                reports.append(report)
        inputs = _run_block(block, inputs, kwargs)
        if on_block is not None:
            on_block(i, block, done, inputs)
        if weights is not None:
            release(block)
        else:
            block.to("cpu")
        bar.set_postfix(loss=f"{sum(r.loss for r in reports[-len(done) :]):.3g}")
    return reports


def _to_cpu(res: QuantResult) -> QuantResult:
    return QuantResult(
        res.codes.cpu(), res.scales.cpu(), res.zeros.cpu(), res.g_idx.cpu(), res.Q.cpu(), res.loss, res.damp_percent
    )


def dequantized_weight(q: QuantizedLinear) -> torch.Tensor:
    """The weight [N, K] that a quantized Linear represents, recomputed from its codes."""
    r = q.result
    return dequantize_codes(r.codes, r.scales, r.zeros, r.g_idx)
