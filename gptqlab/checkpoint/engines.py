"""Which serving engines can serve a GPTQ checkpoint, at the versions the project names, and with how many GPUs.

The rules are data: :data:`RULES` holds one row per rule with the engine, the place in that engine's
source it comes from, and a check of the checkpoint's settings that returns the reason for a refusal.
:func:`tp_problems` adds the tensor-parallel constraints of the Marlin kernels that vLLM and SGLang run
GPTQ on. They were read from the engines' sources (vLLM 0.33.0, SGLang 0.5.23, transformers 5 with
optimum/GPTQModel) for issue 14; a rule that changes upstream changes here, in one row.

``gptqlab verify DIR --engine E [--tp N]`` prints :func:`serving_problems` (exit 1 when there are any);
plain ``gptqlab verify`` prints :func:`summary_line`; ``gptqlab quantize`` can print
:func:`quantize_warnings` before the long work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptqlab.errors import CheckpointError, GptqlabError


@dataclass(frozen=True)
class Engine:
    key: str
    name: str
    version: str
    notes: str
    """What no checkpoint can change (hardware, ignored tensors); printed with ``--engine``."""

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


ENGINES = {
    "vllm": Engine(
        "vllm",
        "vLLM",
        "0.33.0",
        "GPTQ needs a GPU of compute capability 7.5 or newer; qzeros are ignored for symmetric checkpoints "
        "and g_idx is discarded",
    ),
    "sglang": Engine(
        "sglang",
        "SGLang",
        "0.5.23",
        "GPTQ runs on Marlin only on CUDA (the other CUDA GPTQ path was removed); the CPU path rejects gptq_v2",
    ),
    "transformers": Engine(
        "transformers",
        "transformers",
        "5",
        "GPTQ runs through optimum and GPTQModel, which read every bit width, asymmetric zero points and act-order",
    ),
}
TP_ENGINES = ("vllm", "sglang")
"""Engines whose tensor-parallel split :func:`tp_problems` checks; transformers is not a TP server here."""
SUMMARY_TP = (1, 2, 4, 8)


@dataclass(frozen=True)
class Settings:
    """What the settings rules read: the quantization config as written, and the architecture."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    damp_percent: float | None
    model_type: str
    hf_config: bool = True
    """config.json carries ``quantization_config`` (what transformers reads)."""


@dataclass(frozen=True)
class Rule:
    engine: str
    source: str
    refuses: Callable[[Settings], str | None]


def _sym(s: Settings) -> str:
    return f"{s.bits}-bit {'symmetric' if s.sym else 'asymmetric'}"


def _marlin_types(s: Settings) -> str | None:
    if (s.bits, s.sym) in ((4, True), (8, True)):
        return None
    return f"{_sym(s)} is not served: only 4- and 8-bit symmetric GPTQ is ('Unsupported quantization config')"


def _marlin_groups(s: Settings) -> str | None:
    if s.group_size in (-1, 32, 64, 128):
        return None
    return f"group size {s.group_size} is not served: Marlin takes -1, 32, 64 or 128"


def _vllm_desc_act(s: Settings) -> str | None:
    if s.desc_act and s.group_size != -1:
        return (
            f"desc_act with group size {s.group_size} is refused (act-order is served only with group size -1); "
            "quantize with --static-groups to keep act-order and write desc_act: false"
        )
    return None


def _vllm_bloom(s: Settings) -> str | None:
    if s.model_type == "bloom":
        return (
            "BLOOM cannot load: vLLM's BLOOM loader reshapes dimension 0 of every query_key_value tensor, but a "
            "GPTQ tensor's output dimension is dimension 1 (an upstream fix was proposed and closed)"
        )
    return None


def _sglang_bloom(s: Settings) -> str | None:
    return "BLOOM is not served: SGLang has no native BLOOM model" if s.model_type == "bloom" else None


def _tf_damp(s: Settings) -> str | None:
    if s.damp_percent is None or 0 < s.damp_percent < 1:
        return None
    return f"damp_percent {s.damp_percent} is refused: GPTQConfig requires 0 < damp_percent < 1"


def _tf_bits(s: Settings) -> str | None:
    return None if s.bits in (2, 3, 4, 8) else f"bits {s.bits} is refused: GPTQConfig takes 2, 3, 4 or 8"


def _tf_config(s: Settings) -> str | None:
    if s.hf_config:
        return None
    return "config.json has no quantization_config, which is the only place transformers reads GPTQ settings from"


_VLLM_GPTQ = "vllm/model_executor/layers/quantization/gptq_marlin.py (GPTQMarlinConfig, TYPE_MAP)"
_VLLM_MARLIN = "vllm/model_executor/layers/quantization/utils/marlin_utils.py (MARLIN_SUPPORTED_GROUP_SIZES)"
_SGLANG_GPTQ = "python/sglang/srt/layers/quantization/gptq.py (GPTQMarlinConfig)"
_TF_CONFIG = "transformers/utils/quantization_config.py (GPTQConfig.post_init)"

RULES: tuple[Rule, ...] = (
    Rule("vllm", _VLLM_GPTQ, _marlin_types),
    Rule("vllm", _VLLM_MARLIN, _marlin_groups),
    Rule("vllm", _VLLM_GPTQ, _vllm_desc_act),
    Rule("vllm", "vllm/model_executor/models/bloom.py (load_weights)", _vllm_bloom),
    Rule("sglang", _SGLANG_GPTQ, _marlin_types),
    Rule("sglang", "python/sglang/srt/layers/quantization/marlin_utils.py", _marlin_groups),
    Rule("sglang", "python/sglang/srt/models/ (no bloom.py)", _sglang_bloom),
    Rule("transformers", _TF_CONFIG, _tf_damp),
    Rule("transformers", _TF_CONFIG, _tf_bits),
    Rule("transformers", "transformers/quantizers/auto.py (reads config.json quantization_config)", _tf_config),
)

# Marlin's tile constraints on one rank's partition of a quantized Linear (vLLM gptq_marlin / marlin_utils:
# GPTQ_MARLIN_MIN_THREAD_N, GPTQ_MARLIN_MIN_THREAD_K, verify_marlin_supports_shape; the same in SGLang).
MARLIN_MIN_N = 64
MARLIN_MIN_K = 128


@dataclass(frozen=True)
class Shapes:
    """One decoder block's quantized Linears and the attention heads, for the tensor-parallel rules.

    linears: (name inside the block, in_features K, out_features N). row_parallel / fused / kv: as in
    :class:`gptqlab.arch.Arch` (empty when the architecture's parallel layout is unknown).
    """

    heads: int
    kv_heads: int
    head_dim: int
    linears: tuple[tuple[str, int, int], ...]
    row_parallel: tuple[str, ...] = ()
    fused: tuple[tuple[str, ...], ...] = ()
    kv: tuple[str, ...] = ()


def _head_problems(shapes: Shapes, tp: int) -> list[str]:
    problems = []
    if shapes.heads % tp:
        problems.append(f"--tp {tp}: {shapes.heads} attention heads do not split evenly over {tp} GPUs")
    kv = shapes.kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        problems.append(
            f"--tp {tp}: {kv} KV heads can neither be split over nor replicated onto {tp} GPUs "
            f"({kv} must be a multiple or a divisor of {tp})"
        )
    return problems


def tp_problems(shapes: Shapes, group_size: int, tp: int) -> list[str]:
    """The reasons ``tp`` GPUs cannot serve these Linears with Marlin; [] when they can.

    Column-parallel Linears split N (an engine's fused layer is checked as one: the sum of its parts'
    shares, KV parts replicated when the GPUs outnumber the KV heads); row-parallel ones split K. Each
    rank's share needs N divisible by 64 and K by 128, and a group size below K must divide the K share.
    """
    problems = _head_problems(shapes, tp)
    if problems:
        return problems
    if not shapes.row_parallel and tp > 1:
        return [f"--tp {tp}: the tensor-parallel layout of this architecture is unknown to gptqlab"]
    dims = {name: (k, n) for name, k, n in shapes.linears}
    kv_share = shapes.head_dim * max(1, shapes.kv_heads // tp)
    groups = [g for g in shapes.fused if all(n in dims for n in g)]
    grouped = {n for g in groups for n in g}
    groups += [(n,) for n in dims if n not in grouped]
    for group in groups:
        label = "+".join(n.rpartition(".")[2] for n in group)
        k = dims[group[0]][0]
        if group[0] in shapes.row_parallel:
            n = dims[group[0]][1]
            if k % tp:
                problems.append(f"--tp {tp}: {label} has {k} inputs, which do not split over {tp} GPUs")
                continue
            k_share, n_share = k // tp, n
        else:
            shares = []
            for name in group:
                n = dims[name][1]
                shares.append(kv_share if name in shapes.kv and shapes.kv_heads < tp else n // tp)
                if name not in shapes.kv and n % tp:
                    problems.append(f"--tp {tp}: {label} has {n} outputs, which do not split over {tp} GPUs")
            k_share, n_share = k, sum(shares)
        if n_share % MARLIN_MIN_N:
            problems.append(
                f"--tp {tp}: {label} gets {n_share} outputs per GPU; Marlin needs a multiple of {MARLIN_MIN_N}"
            )
        if k_share % MARLIN_MIN_K:
            problems.append(
                f"--tp {tp}: {label} gets {k_share} inputs per GPU; Marlin needs a multiple of {MARLIN_MIN_K}"
            )
        if group_size != -1 and group_size < k and k_share % group_size:
            problems.append(
                f"--tp {tp}: {label} gets {k_share} inputs per GPU, which group size {group_size} does not divide"
            )
    return problems


def settings_problems(settings: Settings, engine: str) -> list[str]:
    """The reasons ``engine`` refuses these settings (one per broken rule, with its source); [] when none."""
    if engine not in ENGINES:
        raise GptqlabError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    out = []
    for rule in RULES:
        if rule.engine == engine:
            reason = rule.refuses(settings)
            if reason:
                out.append(f"{reason} [{rule.source}]")
    return out


@dataclass(frozen=True)
class Checkpoint:
    """What the engine rules read from a checkpoint folder."""

    settings: Settings
    shapes: Shapes


def read_checkpoint(folder: str | Path, trust_remote_code: bool = False) -> Checkpoint:
    """Settings and block shapes of a GPTQ checkpoint folder; raises CheckpointError when it is not one."""
    from torch import nn

    from gptqlab.arch import arch_for, block_list
    from gptqlab.checkpoint.config import find_quant_config, hf_quant_config, parse_quant_config
    from gptqlab.modelfiles import model_config, model_skeleton

    folder = Path(folder)
    found = find_quant_config(folder)
    if found is None:
        raise CheckpointError(f"{folder}: no quantization config, so this is not a GPTQ checkpoint")
    raw, path = found
    qc = parse_quant_config(raw, str(path))
    damp = raw.get("damp_percent")
    config = model_config(folder, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    settings = Settings(
        qc.bits,
        qc.group_size,
        qc.desc_act,
        qc.sym,
        qc.checkpoint_format,
        damp if isinstance(damp, (int, float)) and not isinstance(damp, bool) else None,
        str(getattr(config, "model_type", "")),
        hf_config=hf_quant_config(folder) is not None,
    )
    model = model_skeleton(config, trust_remote_code)
    arch = arch_for(model)
    block = block_list(model, arch)[0]
    linears = tuple((n, m.in_features, m.out_features) for n, m in block.named_modules() if isinstance(m, nn.Linear))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    layout = (arch.row_parallel, arch.fused, arch.kv) if arch is not None else ((), (), ())
    shapes = Shapes(heads, kv_heads, head_dim, linears, *layout)
    return Checkpoint(settings, shapes)


def serving_problems(ckpt: Checkpoint, engine: str, tp: int = 1) -> list[str]:
    """Every reason ``engine`` cannot serve ``ckpt`` on ``tp`` GPUs; [] when it can."""
    if tp < 1:
        raise GptqlabError(f"--tp must be a positive number of GPUs, got {tp}")
    problems = settings_problems(ckpt.settings, engine)
    if engine in TP_ENGINES:
        problems += tp_problems(ckpt.shapes, ckpt.settings.group_size, tp)
    return problems


def summary_line(ckpt: Checkpoint) -> str:
    """One line: each engine, and the GPU counts of :data:`SUMMARY_TP` it can serve the checkpoint on."""
    parts = []
    for key, engine in ENGINES.items():
        if key in TP_ENGINES:
            ok = [tp for tp in SUMMARY_TP if not serving_problems(ckpt, key, tp)]
            verdict = f"yes (--tp {', '.join(map(str, ok))})" if ok else "no"
        else:
            verdict = "no" if serving_problems(ckpt, key) else "yes"
        parts.append(f"{engine.label} {verdict}")
    return "engines: " + "; ".join(parts) + " (details: gptqlab verify DIR --engine NAME)"


def quantize_warnings(qcfg, model_type: str) -> list[str]:
    """For ``gptqlab quantize``, before the long work: one line per engine that will not serve a checkpoint
    made with ``qcfg`` (a :class:`gptqlab.quant.QuantConfig`) for a ``model_type`` model, with its reasons.
    A warning, not a refusal: gptqlab's own loader and transformers read every setting."""
    from gptqlab.checkpoint.format import written_desc_act

    settings = Settings(
        qcfg.bits,
        qcfg.group_size,
        written_desc_act(qcfg),
        qcfg.sym,
        qcfg.checkpoint_format,
        qcfg.damp_percent,
        model_type,
    )
    lines = []
    for key, engine in ENGINES.items():
        reasons = settings_problems(settings, key)
        if reasons:
            lines.append(f"{engine.label} will not serve this checkpoint: " + "; ".join(reasons))
    return lines
