"""The layer-wise driver: runs calibration data through a model one decoder block at a time and quantizes
each block's Linears with GPTQ or RTN.

1. Capture the inputs of the first block (the embeddings run once per batch of samples; the block list
   is swapped for a catcher that records its arguments and stops the forward pass).
2. For each block: bring only that block onto the device; for each true-sequential stage, run the
   calibration batches through the block until the stage's last Linear has run (the rest of the block is
   skipped), summing one Hessian per distinct input with one matrix product per batch; quantize the
   stage's Linears (one Cholesky factorization per distinct Hessian); put the dequantized weights back;
   finally run the whole block to make the next block's inputs, hand the results to ``on_block``, and
   release the block.

Batches. Samples go through a block ``batch_size`` (default :func:`batch_size_for`) at a time: as many
as fit a fixed activation budget (``batch_bytes``), computed from the model's shape and the sequence length
only, so that a resumed run batches exactly as the first one did. The block keyword arguments (masks, rotary
embeddings, ALiBi) are recorded once per batch size. Consecutive batches form the chunks of the Hessian's
chunk tree (:mod:`gptqlab.quantize.distributed.tree`): one batch per chunk, or as many as keep the chunks at
most ``MAX_CHUNKS``. X_cᵀ X_c is summed over a chunk's batches in order, and the chunks pairwise in chunk
order, so the sum has the same bits whether one process or several ranks compute it.

Ranks. Under ``torchrun`` (``ctx``), each rank runs its own consecutive batches through every block; per
stage the Hessians are reduced to the ranks owning the Linears that read them, each Linear is solved by its
owner and its result sent to every rank, and the block outputs are gathered to rank 0 for ``on_block``.

Memory. Besides the block's weights: the layer inputs (``nsamples x seqlen x hidden``, in ``act_dtype``;
the output pass replaces them batch by batch with the outputs), one Hessian per distinct input of the
current stage, and the GPTQ working set of one Linear. Quantized Linears keep uint8 codes on the host until
``on_block``; their dequantized weights live only in the block itself. With ``weights`` (blocks read from the
files one at a time), the parameters outside the blocks are released once the first block's inputs are
captured. Free heap pages go back to the system after every pass and solve (:func:`return_free_memory`).

Precision. Each block keeps its weights in ``dtype``; with ``compute_dtype`` its matrix products in the
forward passes run in that type (autocast: bfloat16 on a CPU with bfloat16 matrix units is about 4x faster
than float32). Hessians are summed in float32 and GPTQ solves float32 copies of the weights either way.

Timing. After every block the driver logs a DEBUG record on the ``gptqlab.driver`` logger whose
``block_timing`` attribute is a :class:`BlockTiming`; a benchmark collects them with a logging handler.

A run can resume at any block: given that block's inputs (the outputs ``on_block`` received for the block
before it), step 1 runs on one batch of each size only, to recompute the keyword arguments, and the
results are bit for bit those of an uninterrupted run.

The algorithm itself lives in :mod:`gptqlab.quant`; this module knows models, not number formats.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from gptqlab.arch import Arch, arch_for, block_list
from gptqlab.errors import ConfigError, GptqlabError
from gptqlab.modelfiles import SafetensorsWeights, materialize, release
from gptqlab.quant import (
    NumericalError,
    QuantConfig,
    QuantResult,
    dequantize_codes,
    gptq,
    hessian_factor,
    rtn,
)
from gptqlab.quantize.distributed import Distributed, HessianSum
from gptqlab.resolve import torch_threads

log = logging.getLogger("gptqlab")
timing_log = logging.getLogger("gptqlab.driver")

METHODS = ("gptq", "rtn")
# Activation memory one batch may use inside a block. Larger batches make fewer, larger matrix products;
# beyond a few thousand tokens per batch the gain is small on a CPU, and the budget keeps a GPU batch of
# 2048-token sequences of a 7B model near 1 GB.
DEFAULT_BATCH_BYTES = 512 * 2**20
# Blocks with fewer parameters than this run on one CPU thread. Their kernels are small, and on a shared
# 2-core CPU (load average 8) two OpenMP threads made a forward pass of tiny-zh-llama 2.5x slower (3.0 s vs
# 1.2 s for 8 x 512 tokens) and its GPTQ solve 7x slower: every kernel waits at a barrier for a thread the
# scheduler has paused. A 1024 x 4096 x 11008 product took the same time on one thread or two under that
# load and half on two threads on a quiet machine, so large blocks keep torch's thread count.
SMALL_BLOCK_PARAMS = 50_000_000
# The Hessian's chunk tree holds up to ceil(log2 C) + 1 partial sums of C chunks (each K x K float32). A chunk
# is a whole number of forward batches, as few as keep C at most MAX_CHUNKS: LLaMA-7B at 128 x 2048 tokens
# runs one sample per batch, and 128 one-batch chunks would hold 8 of down_proj's 11008² (3.9 GB) against 5
# (2.4 GB) here. It also caps torchrun ranks at MAX_CHUNKS.
MAX_CHUNKS = 16


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
    """What a sink receives for each Linear: the quantizer's result (on the host, without its dequantized
    weight ``Q``), the Linear's bias (or None) and the Linear's report (also among those that
    :func:`quantize_model` returns)."""

    result: QuantResult
    bias: torch.Tensor | None
    report: LayerReport


@dataclass
class BlockTiming:
    """Where one block's time went, in seconds. ``finished_at`` is ``time.time()`` when it was done."""

    block: int
    forward: float = 0.0  # stage passes and the output pass
    hessian: float = 0.0  # Hessian updates (inside the stage passes' hooks)
    solve: float = 0.0  # factorizations and GPTQ/RTN
    total: float = 0.0
    batch_size: int = 1
    finished_at: float = 0.0


class _StageHessians:
    """Forward hooks on one stage's Linears: one :class:`HessianSum` per distinct input tensor (q/k/v,
    gate/up share theirs), fed once per forward batch (a chunk of the chunk tree or part of one), and a stop
    once every Linear of the stage has run in the current forward pass."""

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        ctx: Distributed,
        num_chunks: int,
        stop: bool,
    ):
        self.modules = modules
        self.ctx = ctx
        self.num_chunks = num_chunks
        self.stop = stop
        self.acc: dict[str, HessianSum] = {}
        self.owner: dict[str, str] = {}  # Linear → the Linear whose accumulator holds its Hessian
        self._seen: list[tuple[torch.Tensor, str]] = []  # (input, owner) in the current forward
        self._fired: set[str] = set()
        self.ends_chunk = True
        self.seconds = 0.0

    def hook(self, name: str):
        def fn(_module, args, _out):
            t0 = time.perf_counter()
            x = args[0]
            same = next((o for t, o in self._seen if t is x), None)
            if same is None:
                if self.owner.setdefault(name, name) != name:
                    raise GptqlabError(f"{name} read a different input than in the first batch")
                acc = self.acc.get(name) or self.acc.setdefault(
                    name,
                    self.ctx.hessian(self.modules[name].in_features, self.num_chunks),
                )
                with torch.autocast(x.device.type, enabled=False):  # H in float32 even under autocast
                    acc.add(x, self.ends_chunk)
                self._seen.append((x, name))
            elif self.owner.setdefault(name, same) != same:
                raise GptqlabError(f"{name} read a different input than in the first batch")
            self._fired.add(name)
            self.seconds += time.perf_counter() - t0
            if self.stop and len(self._fired) == len(self.modules):
                raise _StageDone

        return fn

    def new_pass(self, ends_chunk: bool = True) -> None:
        """Start a forward pass over the next batch; ``ends_chunk``: it is the last batch of its chunk."""
        self._seen.clear()
        self._fired.clear()
        self.ends_chunk = ends_chunk

    def reduce(self, names: list[str], owners: list[int], prefix: str) -> dict[str, torch.Tensor | None]:
        """{distinct input: its Hessian [K, K]} on the ranks that own a Linear reading it (None elsewhere),
        reduced in stage order, the same on every rank."""
        out = {}
        for d in dict.fromkeys(self.owner[n] for n in names):
            users = [r for n, r in zip(names, owners, strict=True) if self.owner[n] == d]
            out[d] = self.acc.pop(d).reduce(users, f"{prefix}.{d}")
        return out


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass once the first block's inputs are recorded."""


class _StageDone(Exception):
    """Raised by a stage hook once every Linear of the stage has seen its input."""


class _Catcher(nn.Module):
    def __init__(self, store: list, kwargs_by_size: dict):
        super().__init__()
        self.store = store
        self.kwargs_by_size = kwargs_by_size

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append(hidden_states)
        self.kwargs_by_size.setdefault(hidden_states.shape[0], kwargs)
        raise _Captured


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


def batch_size_for(model: nn.Module, seqlen: int, nsamples: int, batch_bytes: int = DEFAULT_BATCH_BYTES) -> int:
    """Samples per forward batch: the most whose float32 activations inside one block fit ``batch_bytes``.

    Per token a block holds about 6 hidden-size vectors (residual, norm, q, k, v, attention output) and 3
    intermediate-size ones (gate, up, their product); per sample the attention scores take
    heads x seqlen² values. Depends on the config and seqlen only, so it is the same on every run.
    """
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 4096
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 32
    per_sample = 4 * (seqlen * (6 * hidden + 3 * inter) + 2 * heads * seqlen * seqlen)
    return max(1, min(nsamples, batch_bytes // per_sample))


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    arch: Arch,
    input_ids: torch.Tensor,
    device: torch.device,
    batch: int = 1,
) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Inputs of the first decoder block for the calibration samples, ``batch`` at a time, and the keyword
    arguments the model passes to its blocks (masks, rotary embeddings, ALiBi) for each batch size.

    input_ids: [nsamples, seqlen]. Returns ([hidden [b, seqlen, hidden_size]] per batch, {b: kwargs}).
    """
    parent_path, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    blocks = getattr(parent, attr)
    store: list = []
    kwargs_by_size: dict[int, dict] = {}
    setattr(parent, attr, nn.ModuleList([_Catcher(store, kwargs_by_size)]))
    try:
        model.to(device)
        for j in range(0, input_ids.shape[0], batch):
            try:
                model(input_ids[j : j + batch].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        model.to("cpu")  # before the blocks come back: they may hold meta parameters
        setattr(parent, attr, blocks)
    for kwargs in kwargs_by_size.values():
        kwargs.pop("past_key_values", None)
        kwargs.pop("layer_past", None)
        kwargs["use_cache"] = False
    return store, kwargs_by_size


def _products_in(block: nn.Module, compute_dtype: torch.dtype | None):
    """A context in which the block's matrix products run in ``compute_dtype`` (autocast; its weights keep
    their own dtype, so GPTQ still reads them exactly), or a no-op context for None or the weights' dtype."""
    device = next(block.parameters()).device.type
    if compute_dtype is None or compute_dtype == _param_dtype(block):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=compute_dtype)


def _run_block(
    block: nn.Module,
    inputs: list,
    kwargs_by_size: dict,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list:
    """The block's outputs for each batch of ``inputs``, which they replace one by one in the same list, so that
    inputs and outputs of all samples (each nsamples x seqlen x hidden) are never held at once."""
    dtype = _param_dtype(block)
    with _products_in(block, compute_dtype):
        for k, x in enumerate(inputs):
            y = _first(block(x.to(dtype), **kwargs_by_size[x.shape[0]]))
            inputs[k] = y if out_dtype is None else y.to(out_dtype)
            del x, y
    return inputs


def _param_dtype(block: nn.Module) -> torch.dtype:
    return next(p.dtype for p in block.parameters() if p.is_floating_point())


def _collect(
    block: nn.Module,
    hooks: _StageHessians,
    names,
    inputs: list,
    kwargs_by_size: dict,
    compute_dtype: torch.dtype | None = None,
    batches_per_chunk: int = 1,
) -> None:
    handles = [hooks.modules[n].register_forward_hook(hooks.hook(n)) for n in names]
    try:
        dtype = _param_dtype(block)
        with _products_in(block, compute_dtype):
            for k, x in enumerate(inputs):  # this rank's batches; its first one starts a chunk
                hooks.new_pass(ends_chunk=(k + 1) % batches_per_chunk == 0 or k == len(inputs) - 1)
                try:
                    block(x.to(dtype), **kwargs_by_size[x.shape[0]])
                except _StageDone:
                    pass
    finally:
        for h in handles:
            h.remove()
        hooks.new_pass()


def _quantize_weight(
    name: str,
    W: torch.Tensor,
    H: torch.Tensor | None,
    qcfg: QuantConfig,
    method: str,
    factor=None,
) -> QuantResult:
    if not bool(torch.isfinite(W).all()):
        raise GptqlabError(f"layer {name}: the weights contain NaN or Inf; the checkpoint is damaged")
    try:
        res = gptq(W, H, qcfg, factor=factor) if method == "gptq" else rtn(W, qcfg, H)
    except NumericalError as exc:
        raise _numerical(name, exc, H) from exc
    if res.damp_percent is not None and res.damp_percent != qcfg.damp_percent:
        log.warning(
            "layer %s: Cholesky failed, damp_percent raised %g → %g",
            name,
            qcfg.damp_percent,
            res.damp_percent,
        )
    return res


def _numerical(name: str, exc: Exception, H: torch.Tensor) -> GptqlabError:
    # diag(H)[k] = 2 · mean of x_k², so this is the RMS of the loudest input channel.
    rms = float(torch.sqrt(torch.diag(H).max() / 2))
    return GptqlabError(
        f"layer {name}: {exc}; its loudest input channel has RMS {rms:.3g}, so check the weights that feed "
        "this layer (e.g. a norm) and the calibration data"
    )


class _StageSolver:
    """The solve of each Linear of a stage on the rank that owns it. The Hessian of each distinct input is
    factored once, when the first Linear that reads it is solved on this rank, and then freed: GPTQ needs
    only the factor, and for a 11008-input down_proj H is 485 MB. Errors (a factorization that no dampening
    fixes) are raised inside the solve, so that :meth:`Distributed.solve_stage` stops every rank with them."""

    def __init__(
        self,
        hessians: dict,
        owner: dict[str, str],
        qcfg: QuantConfig,
        method: str,
        prefix: str,
    ):
        self.hessians = hessians
        self.owner = owner
        self.qcfg = qcfg
        self.method = method
        self.prefix = prefix
        self.factors: dict = {}

    def solve(self, name: str, lin: nn.Linear) -> Callable[[], QuantResult]:
        return lambda: self._solve(name, lin)

    def _solve(self, name: str, lin: nn.Linear) -> QuantResult:
        d = self.owner[name]
        H = self.hessians[d]
        if self.method == "gptq" and d not in self.factors and H is not None and bool(torch.isfinite(H).all()):
            try:  # a non-finite H is left to gptq, which raises the message that names the layer
                self.factors[d] = hessian_factor(H, self.qcfg.damp_percent, self.qcfg.desc_act)
            except NumericalError as exc:
                raise _numerical(f"{self.prefix}.{d}", exc, H) from exc
            self.hessians[d] = H = None
        result = _quantize_weight(
            f"{self.prefix}.{name}",
            lin.weight.data,
            H,
            self.qcfg,
            self.method,
            self.factors.get(d),
        )
        return_free_memory()
        return result


def cpu_threads(model: nn.Module, device: str | torch.device, threads: int | None = None) -> int | None:
    """The CPU threads :func:`quantize_model` runs on: ``threads``, else 1 for blocks under
    ``SMALL_BLOCK_PARAMS`` parameters, else torch's setting; None off the CPU. (GPTQ's bits depend on it:
    MKL splits sums across threads.)"""
    if torch.device(device).type != "cpu":
        return None
    if threads is None:
        per_block = sum(p.numel() for p in block_list(model, arch_for(model))[0].parameters())
        threads = 1 if per_block < SMALL_BLOCK_PARAMS else torch.get_num_threads()
    return threads


def hessian_chunks(nsamples: int, batch: int) -> tuple[int, int, int]:
    """How the samples are cut into the Hessian's chunks: (forward batches per chunk, samples per chunk,
    number of chunks), as few batches per chunk as keep the chunks at most ``MAX_CHUNKS``."""
    per_chunk = math.ceil(math.ceil(nsamples / batch) / MAX_CHUNKS)
    chunk = per_chunk * batch
    return per_chunk, chunk, math.ceil(nsamples / chunk)


def cpu_compute_dtype(choice: str = "auto") -> torch.dtype:
    """The dtype of the CPU forward passes' matrix products for ``--cpu-compute`` ``choice``: auto gives
    bfloat16 where the CPU has bfloat16 matrix instructions (AMX or AVX512-BF16; a 2048 x 5504 x 4096 product
    took 159 ms there against 630 ms in float32 on one thread of the 2-core VM), else float32."""
    if choice != "auto":
        return getattr(torch, choice)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch.cpu probes: absent → no
    fast = any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return torch.bfloat16 if fast else torch.float32


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
    act_dtype: torch.dtype | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    threads: int | None = None,
    batch_size: int | None = None,
    ctx: Distributed | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[LayerReport]:
    """Quantize every decoder-block Linear of ``model`` in place, block by block.

    model: a transformers causal LM. With ``weights`` given, its blocks hold meta parameters and each block
        is loaded from ``weights`` in ``dtype`` when its turn comes, then released (peak memory: one
        block). Without, the model is fully loaded and each quantized Linear keeps its dequantized weight
        (fake-quant), so the returned model can be evaluated directly.
    input_ids: [nsamples, seqlen] calibration tokens.
    on_block(i, block, {linear name: QuantizedLinear}, outputs): called after block i while its weights are
        still loaded, e.g. to pack and store it. outputs: block i's outputs for every sample
        ([hidden [1, seqlen, hidden_size]] * nsamples, views on ``device``), which are block i+1's inputs.
    start, inputs: resume at block ``start`` (0 < start <= number of blocks) with ``inputs``, the outputs
        that on_block received for block start-1. Blocks before ``start`` are left untouched.
    act_dtype: dtype in which layer inputs and outputs are kept between blocks (default: ``dtype``); a
        half-precision type halves their memory, each block still computes in its weights' dtype.
    batch_bytes: activation budget of one forward batch, see :func:`batch_size_for`.
    threads: CPU threads while quantizing (restored afterwards); default: :func:`cpu_threads`. Ignored on
        other devices.
    batch_size: samples per forward batch; default: :func:`batch_size_for` with ``batch_bytes``. The
        batches make the chunks of the Hessian's chunk tree (:mod:`gptqlab.quantize.distributed.tree`), so
        the bits depend on it; it must not depend on the machine or the number of ranks.
    ctx: the ranks of a ``torchrun`` run (default: this process alone). Each rank runs its chunks of the
        samples, the Hessians are reduced to the ranks that own the Linears reading them, each Linear is
        solved by its owner and its result shared, so every rank holds the same quantized block; the block
        outputs are gathered to rank 0, which alone calls ``on_block`` and shows progress. With
        ``start``, only rank 0 passes ``inputs``. The result is bit for bit that of one process with the
        same threads per process.
    compute_dtype: the dtype of the blocks' matrix products in the forward passes (autocast), e.g. bfloat16
        on a CPU with bfloat16 matrix units while the weights stay float32; the Hessians are still summed and
        GPTQ still solved in float32 on the float32 weights. Default (None): the weights' dtype.
    Returns one LayerReport per Linear of the blocks it quantized, in block order (on every rank).
    """
    batch = batch_size or batch_size_for(model, input_ids.shape[1], input_ids.shape[0], batch_bytes)
    ctx = ctx or Distributed.single(device)
    with torch_threads(cpu_threads(model, device, threads)):
        if method not in METHODS:
            raise GptqlabError(f"unknown method {method!r}; choose gptq or rtn")
        device = torch.device(device)
        act_dtype = act_dtype or dtype
        arch = arch_for(model)
        blocks = block_list(model, arch)
        nsamples = input_ids.shape[0]
        per_chunk, chunk, num_chunks = hessian_chunks(nsamples, batch)
        if ctx.world > num_chunks:
            raise ConfigError(
                f"{ctx.world} ranks but the samples make only {num_chunks} Hessian chunk{'s' * (num_chunks != 1)} of "
                f"up to {chunk} samples ({batch} per forward batch) to share among them; start fewer ranks (at most "
                f"{MAX_CHUNKS}), or give more --nsamples or a smaller --batch-size"
            )
        mine = ctx.my_samples(nsamples, chunk)  # this rank's chunks: consecutive samples, cut into batches below
        if start:
            if (ctx.is_writer and inputs is None) or not 0 < start <= len(blocks):
                raise ValueError(f"resuming at block {start} of {len(blocks)} needs that block's inputs")
            inputs = ctx.scatter_inputs(inputs if ctx.is_writer else None, ctx.sample_counts(nsamples, chunk))
            sizes = sorted({min(batch, mine.stop - j) for j in range(mine.start, mine.stop, batch)})
            kwargs_by_size = {}
            for b in sizes:  # the keyword arguments for each batch size, from the first samples
                kwargs_by_size.update(capture_inputs(model, arch, input_ids[:b], device, b)[1])
            batches = [
                torch.cat([x.to(device, act_dtype) for x in inputs[j : j + batch]]) for j in range(0, len(mine), batch)
            ]
        else:
            batches, kwargs_by_size = capture_inputs(model, arch, input_ids[mine.start : mine.stop], device, batch)
            batches = [x.to(act_dtype) for x in batches]
        if weights is not None:  # the embeddings and the head are not needed again (7B: 1 GB in float32)
            release(model, skip=arch.blocks)
        reports: list[LayerReport] = []
        stages = arch.stages if qcfg.true_sequential else (arch.linears,)
        bar = tqdm(
            range(start, len(blocks)),
            desc=f"{method} {qcfg.bits}-bit",
            unit="block",
            initial=start,
            total=len(blocks),
            disable=not (progress and ctx.is_writer),
        )
        for i in bar:
            t_block = time.perf_counter()
            timing = BlockTiming(i, batch_size=batch)
            block = blocks[i]
            prefix = f"{arch.blocks}.{i}"
            if weights is not None:
                materialize(block, prefix, weights, device, dtype)
            else:
                block.to(device=device, dtype=dtype)
            modules = dict(block.named_modules())
            done: dict[str, QuantizedLinear] = {}
            for stage in stages:
                hooks = _StageHessians({n: modules[n] for n in stage}, ctx, num_chunks, stop=True)
                t0 = time.perf_counter()
                _collect(block, hooks, stage, batches, kwargs_by_size, compute_dtype, per_chunk)
                return_free_memory()  # the pass's activations, before the factorizations allocate K x K
                timing.forward += time.perf_counter() - t0 - hooks.seconds
                t0 = time.perf_counter()
                owners = ctx.owners([(modules[n].out_features, modules[n].in_features) for n in stage])
                hessians = hooks.reduce(stage, owners, prefix)
                timing.hessian += hooks.seconds + time.perf_counter() - t0
                solver = _StageSolver(hessians, hooks.owner, qcfg, method, prefix)
                t0 = time.perf_counter()
                solved = ctx.solve_stage(
                    owners,
                    [solver.solve(n, modules[n]) for n in stage],
                    [f"{prefix}.{n}" for n in stage],
                )
                timing.solve += time.perf_counter() - t0
                for n, outcome in zip(stage, solved, strict=True):
                    lin, res = modules[n], outcome.result
                    lin.weight.data = res.Q.to(device=lin.weight.device, dtype=lin.weight.dtype)
                    bias = None if lin.bias is None else lin.bias.data.detach().to("cpu")
                    loss = res.loss if res.loss is not None else float("nan")
                    report = LayerReport(
                        f"{prefix}.{n}",
                        lin.in_features,
                        lin.out_features,
                        loss,
                        outcome.seconds,
                        res.damp_percent,
                    )
                    done[n] = QuantizedLinear(_to_host(res), bias, report)
                    reports.append(report)
                del hooks, hessians, solver, solved
                return_free_memory()
            t0 = time.perf_counter()
            batches = _run_block(block, batches, kwargs_by_size, act_dtype, compute_dtype)
            timing.forward += time.perf_counter() - t0
            everything = ctx.gather_inputs(batches)  # rank 0: every rank's batches, in sample order
            if on_block is not None and ctx.is_writer:
                on_block(
                    i,
                    block,
                    done,
                    [x[j : j + 1] for x in everything for j in range(x.shape[0])],
                )
            del everything
            if weights is not None:
                release(block)
            else:
                block.to("cpu")
            return_free_memory()
            bar.set_postfix(loss=f"{sum(r.loss for r in reports[-len(done) :]):.3g}")
            timing.total = time.perf_counter() - t_block
            timing.finished_at = time.time()
            timing_log.debug(
                "block %d: %.2f s (forward %.2f, hessians %.2f, solve %.2f; batch %d)",
                i,
                timing.total,
                timing.forward,
                timing.hessian,
                timing.solve,
                batch,
                extra={"block_timing": timing},
            )
        return reports


def return_free_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Tensors of a few MB come from the heap, and the heap keeps what they free: between the stage passes and
    solves of a block, whose working sets differ in shape, the held-but-free part grew to several hundred MB
    on random-llama-2048 and counted in the peak RSS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _to_host(res: QuantResult) -> QuantResult:
    """The result on the host, once per Linear, without its dequantized weight."""
    return replace(
        res,
        codes=res.codes.cpu(),
        scales=res.scales.cpu(),
        zeros=res.zeros.cpu(),
        g_idx=res.g_idx.cpu(),
        Q=None,
    )


def dequantized_weight(q: QuantizedLinear) -> torch.Tensor:
    """The weight [N, K] that a quantized Linear represents, recomputed from its codes."""
    r = q.result
    return dequantize_codes(r.codes, r.scales, r.zeros, r.g_idx)
