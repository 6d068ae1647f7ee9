"""Where the decoder blocks and their Linears live in each supported architecture.

An :class:`Arch` names the ModuleList of decoder blocks and the stages of Linears inside one block, in
execution order. Linears in one stage read the same input, so their Hessians are collected in one pass;
with true-sequential quantization each stage sees the outputs of the already-quantized stages before it.
Models not in the table go through :func:`discover`, which finds the block list and orders Linears by a
traced forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gptqlab.errors import GptqlabError


@dataclass(frozen=True)
class Arch:
    """blocks: dotted path of the decoder-block ModuleList; stages: Linear names inside one block.

    How serving engines split the block under tensor parallelism (:mod:`gptqlab.checkpoint.engines`):
    row_parallel: Linears whose input dimension is split across ranks; every other Linear splits its output.
    fused: groups of Linears an engine merges into one layer (q/k/v into qkv_proj, gate/up into gate_up_proj).
    kv: Linears that produce key/value heads, which are replicated when the ranks outnumber the KV heads.
    Empty for a discovered architecture: nothing is known about its parallel layout.
    """

    name: str
    blocks: str
    stages: tuple[tuple[str, ...], ...]
    row_parallel: tuple[str, ...] = ()
    fused: tuple[tuple[str, ...], ...] = ()
    kv: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for stage in self.stages for n in stage)


_LLAMA_STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

_LLAMA_PARALLEL = {
    "row_parallel": ("self_attn.o_proj", "mlp.down_proj"),
    "fused": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
    "kv": ("self_attn.k_proj", "self_attn.v_proj"),
}

ARCHS = {
    "llama": Arch("llama", "model.layers", _LLAMA_STAGES, **_LLAMA_PARALLEL),
    "qwen2": Arch("qwen2", "model.layers", _LLAMA_STAGES, **_LLAMA_PARALLEL),
    "mistral": Arch("mistral", "model.layers", _LLAMA_STAGES, **_LLAMA_PARALLEL),
    "bloom": Arch(
        "bloom",
        "transformer.h",
        (
            ("self_attention.query_key_value",),
            ("self_attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        row_parallel=("self_attention.dense", "mlp.dense_4h_to_h"),
    ),
}


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def discover(model: nn.Module) -> Arch:
    """Find the decoder blocks of an unknown decoder-only model: the longest ModuleList whose entries all
    have the same class and contain Linears. Stages are single Linears in module order (a conservative
    true-sequential order that needs no tracing)."""
    best: tuple[int, str] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(b) for b in mod}
            if len(kinds) == 1 and _linear_names(mod[0]) and (best is None or len(mod) > best[0]):
                best = (len(mod), name)
    arch_name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if best is None:
        raise GptqlabError(
            f"architecture {arch_name!r} is not supported: no list of decoder blocks with Linear layers was found"
        )
    blocks = model.get_submodule(best[1])
    return Arch(arch_name, best[1], tuple((n,) for n in _linear_names(blocks[0])))


def arch_for(model: nn.Module) -> Arch:
    """The Arch of ``model``: from the table by ``config.model_type``, else discovered."""
    model_type = getattr(model.config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        arch = discover(model)
    blocks = model.get_submodule(arch.blocks)
    present = dict(blocks[0].named_modules())
    missing = [n for n in arch.linears if not isinstance(present.get(n), nn.Linear)]
    if missing:
        raise GptqlabError(f"architecture {model_type!r}: expected Linear layers {missing} in each block")
    return arch


def block_list(model: nn.Module, arch: Arch) -> nn.ModuleList:
    blocks = model.get_submodule(arch.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise GptqlabError(f"{arch.blocks} is not a ModuleList in this {arch.name} model")
    return blocks
