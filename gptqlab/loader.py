"""``gptqlab.load``: a GPTQ checkpoint as a regular transformers model whose quantized Linears are
:class:`~gptqlab.qlinear.QuantLinear` (weights stay packed; Triton kernels on CUDA, torch's int4 kernel on
the CPU).

The model is built with meta parameters, then each tensor is read from the safetensors files through
mmap: quantized Linears are replaced by QuantLinear built from their file tensors, everything else is
loaded as it is. Nothing is unpickled; ``.bin`` weights are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gptqlab.checkpoint.config import CheckpointQuantConfig, read_quant_config
from gptqlab.checkpoint.verify import ensure_sound
from gptqlab.errors import CheckpointError, GptqlabError
from gptqlab.kernels import BACKENDS, cpu
from gptqlab.modelfiles import materialize, model_config, model_skeleton, open_weights

CPU_THREADS = 1
"""Default torch thread count for ``gptqlab.load(device="cpu")`` on a machine with at most
:data:`FEW_CORES` usable cores. On the shared 2-core AMX Xeon, greedy decode of a 4-bit random LLaMA
(hidden 2048, 8 layers) ran at 17.4 tokens/s on one thread and 1.5 tokens/s on two, alternated in one
process (benchmarks/results/cpu-2core/latency-cpu-threads.json, from
``gptqlab.benchmarks.bench_latency.thread_sweep``): the second core is busy with other work, and each
thread then waits for the slowest."""

FEW_CORES = 2
"""Up to this many usable cores, :data:`CPU_THREADS` replaces torch's default; above it torch's default
(one thread per physical core) is kept, except for small models (:data:`SMALL_MODEL_PARAMS`)."""

SMALL_MODEL_PARAMS = 100_000_000
"""Below this many parameters a CPU forward pass runs on :data:`CPU_THREADS` by default, whatever the core
count: the matmuls are too small for threads to pay for their synchronisation, which on a shared CPU costs
5-10x (measured on the 2-core VM: 0.13 s vs 0.7-1.3 s per 512-token window of tiny-zh-llama)."""


def _resolve_dir(name_or_path: str) -> Path:
    from gptqlab.resolve import resolve_model_dir

    return resolve_model_dir(name_or_path)


def default_cpu_threads(n_params: int | None = None) -> int | None:
    """The one rule for the torch thread count on the CPU when none is given (``load``, ``gptqlab eval``):
    :data:`CPU_THREADS` on machines with at most :data:`FEW_CORES` usable cores or for a model of fewer than
    :data:`SMALL_MODEL_PARAMS` parameters (``n_params``; None: unknown), else None (keep torch's default)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    small = n_params is not None and n_params < SMALL_MODEL_PARAMS
    return CPU_THREADS if cores <= FEW_CORES or small else None


def default_dtype(device: torch.device, backend: str, quantized: bool) -> torch.dtype:
    """The activation dtype ``load`` uses when none is given: float16 on CUDA; on the CPU bfloat16 for a
    quantized model whose layers run torch's int4 kernel (backend "auto" on a torch that has it), which
    computes in bf16 whatever it is given, else float32."""
    if device.type == "cuda":
        return torch.float16
    if quantized and backend == "auto" and cpu.kernel_available():
        return torch.bfloat16
    return torch.float32


def _set_threads(device: torch.device, threads: int | None, model: nn.Module) -> None:
    if device.type != "cpu":
        return
    threads = threads or default_cpu_threads(sum(p.numel() for p in model.parameters()))
    if threads is not None:
        torch.set_num_threads(threads)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantized_linear_names(model: nn.Module, weights) -> list[str]:
    """Names of the model's Linears that the checkpoint stores packed (``<name>.qweight`` present)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.qweight" in weights]


def _build_qlinear(name: str, lin: nn.Linear, weights, qc: CheckpointQuantConfig, device, dtype):
    from gptqlab.qlinear import QuantLinear

    def get(key: str, optional: bool = False):
        full = f"{name}.{key}"
        if optional and full not in weights:
            return None
        return weights.get(full).to(device)

    bias = get("bias", optional=True)
    layer = QuantLinear.from_checkpoint(  # validates the tensors (checkpoint.validate.check_linear)
        get("qweight"),
        get("qzeros"),
        get("scales"),  # as stored: casting fp16 scales to bf16 would change W
        get("g_idx", optional=True),
        None if bias is None else bias.to(dtype),
        bits=qc.bits,
        group_size=qc.group_size,
        in_features=lin.in_features,
        out_features=lin.out_features,
        zero_offset=qc.zero_offset,
        name=name,
    )
    if (lin.bias is not None) != (layer.bias is not None) and lin.bias is not None:
        # AutoGPTQ writes all-zero biases; a model that has a bias but whose stored bias is all zero is fine.
        layer.bias = torch.zeros(lin.out_features, dtype=dtype, device=device)
    return layer


def load(
    name_or_path: str,
    device: str = "auto",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    threads: int | None = None,
):
    """Load a GPTQ checkpoint (or an unquantized model) as a transformers ``PreTrainedModel``.

    name_or_path: an embedded model name, a local folder, or a Hub id.
    device: "auto" (cuda if available), "cpu" or "cuda".
    backend: for every QuantLinear. "auto": Triton kernels on CUDA; on the CPU, each layer is repacked once
        for torch's int4 kernel (:mod:`gptqlab.kernels.cpu`: bf16 scales, about 0.3 % relative error
        against the exact dequantized weight), and a layer that cannot be repacked logs the reason once
        and runs the torch reference. "triton" or "torch": that implementation for every layer ("torch"
        on the CPU keeps the exact GPTQ weight, dequantizing each layer per call: slow).
    dtype: activations and unquantized weights. None (:func:`default_dtype`): float16 on CUDA; on the CPU
        bfloat16 for a quantized model on the int4 kernel (backend "auto"), float32 otherwise (unquantized
        models, backend "torch"). The kernel computes in bf16 anyway; bf16 activations spare the casts
        around it and make the rest of the model bf16: greedy decode of a 4-bit random LLaMA (hidden 2048,
        8 layers, 1 thread) ran at 19.0 tokens/s against 17.0 with float32 activations (GPTQModel 19.3;
        benchmarks/results/cpu-2core/latency-cpu-llama2k-w4-run2.json), at the price of logits about
        0.5 % from the exact reference instead of 0.3 % (tests/kernels/test_cpu_models.py). Pass
        ``dtype=torch.float32`` for float32 activations around the kernel, and ``backend="torch"`` too for
        the exact GPTQ weight.
    threads: on the CPU, the torch thread count to set (``torch.set_num_threads``, process-wide). None
        applies :func:`default_cpu_threads`: :data:`CPU_THREADS` (1) on machines with at most 2 usable
        cores, where it decoded faster than 2 threads, or for models below :data:`SMALL_MODEL_PARAMS`
        parameters; torch's default otherwise. Ignored on CUDA.
    Raises CheckpointError (one line) for a checkpoint that breaks docs/FORMAT.md, and for weights that are
    only a pickle that torch's safe loader refuses (nothing is unpickled, quantized or not).
    Reads every variant of docs/FORMAT.md: gptqlab, GPTQModel (v1), transformers/optimum (gptq_v2), legacy
    AutoGPTQ files (``gptq_model-4bit-128g.safetensors``, zero biases), act-order and 8-bit checkpoints.
    """
    from transformers import AutoModelForCausalLM

    if backend not in BACKENDS:
        raise GptqlabError(f"backend must be one of {BACKENDS}, got {backend!r}")
    folder = _resolve_dir(name_or_path)
    from gptqlab.resolve import resolve_device

    dev = resolve_device(device)
    if threads is not None and threads < 1:
        raise GptqlabError(f"threads must be at least 1, got {threads}")
    qc = read_quant_config(folder)
    dtype = dtype or default_dtype(dev, backend, quantized=qc is not None)
    if qc is None:
        # the safe reader first: a folder whose weights are only a pickle that torch's weights-only loader
        # refuses gets a one-line CheckpointError here, not transformers' advice to unpickle it anyway
        open_weights(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        _set_threads(dev, threads, model)
        return model.to(dev).eval()

    config = model_config(folder, trust_remote_code)
    raw_qc = getattr(config, "quantization_config", None)
    if raw_qc is not None:
        del config.quantization_config  # build a plain model; gptqlab does the quantized layers itself
    model = model_skeleton(config, trust_remote_code)
    _set_threads(dev, threads, model)  # the dense parameter count, before the Linears are packed
    weights = open_weights(folder, prefix=model.base_model_prefix, model=model)
    names = quantized_linear_names(model, weights)
    if not names:
        raise CheckpointError(f"{folder}: the config says GPTQ, but no tensor named '*.qweight' matches the model")
    ensure_sound(folder, model, weights, qc)
    for name in names:
        lin = model.get_submodule(name)
        layer = _build_qlinear(name, lin, weights, qc, dev, dtype)
        layer.backend = backend
        if dev.type == "cpu" and backend == "auto":
            layer.use_cpu_kernel()  # logs the reason once when it cannot
        _set_module(model, name, layer)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and getattr(model.config, "tie_word_embeddings", False):
        # meta_parameters() broke the tie; restore it so materialize loads the shared weight once, by the
        # input embedding's name (a tied checkpoint stores no lm_head.weight)
        out_emb.weight = in_emb.weight
    if any(p.device.type == "meta" for p in model.parameters()):
        materialize(model, "", weights, dev, dtype)
    if out_emb is not None and out_emb.weight.device.type == "meta":
        out_emb.weight = in_emb.weight
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: {', '.join(leftover[:5])}")
    for buf_name, buf in model.named_buffers():
        if buf.device.type == "meta":
            raise CheckpointError(f"{folder}: buffer {buf_name} was not initialised")
    model.config.quantization_config = raw_qc if raw_qc is not None else qc.__dict__
    model.gptqlab_quant_config = qc
    return model.to(dev).eval()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer that belongs to an embedded model name, a local folder or a Hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_resolve_dir(name_or_path), trust_remote_code=trust_remote_code)
