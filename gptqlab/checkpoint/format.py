"""The GPTQ checkpoint layout (docs/FORMAT.md): QuantResult ⇄ file tensors, and the config dict.

Per quantized Linear, with K = in_features, N = out_features, G = K / group_size:

    qweight  int32 [K·bits/32, N]  codes packed along the input dimension (:func:`pack_rows`)
    qzeros   int32 [G, N·bits/32]  zero points packed along the output dimension (:func:`pack_cols`),
                                   stored as z - 1 in "gptq" (v1) and as z in "gptq_v2"
    scales   fp16  [G, N]
    g_idx    int32 [K]
    bias     fp16  [N]             only when the Linear has a bias

W[k, n] = scales[g_idx[k], n] · (q[k, n] - z[g_idx[k], n]); the torch Linear weight is Wᵀ.
"""

from __future__ import annotations

import enum

import torch

from gptqlab import __version__
from gptqlab.errors import CheckpointError
from gptqlab.quant import QuantConfig, QuantResult
from gptqlab.quant.pack import pack_cols, pack_rows, unpack_cols, unpack_rows

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointFormat(str, enum.Enum):
    """How zero points are stored."""

    V1 = "gptq"
    """The file stores z - 1; readers add 1. AutoGPTQ's and vLLM's default."""
    V2 = "gptq_v2"
    """The file stores z unchanged. transformers' GPTQConfig path writes this."""

    @property
    def zero_offset(self) -> int:
        return 1 if self is CheckpointFormat.V1 else 0


def to_checkpoint(res: QuantResult, bits: int, fmt: str, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """File tensors of one Linear from its quantizer result (codes [N, K], scales/zeros [N, G])."""
    offset = CheckpointFormat(fmt).zero_offset
    zeros = res.zeros.t().contiguous() - offset  # [G, N]
    if int(zeros.min()) < 0:
        raise ValueError("a zero point of 0 cannot be stored in the v1 'gptq' format; quantize for gptq_v2")
    out = {
        "qweight": pack_rows(res.codes.t().contiguous(), bits),
        "qzeros": pack_cols(zeros, bits),
        "scales": res.scales.t().contiguous().to(torch.float16),
        "g_idx": res.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.to(torch.float16).contiguous()
    return out


def from_checkpoint(tensors: dict[str, torch.Tensor], bits: int, fmt: str) -> QuantResult:
    """Inverse of :func:`to_checkpoint`: codes [N, K], scales [N, G] float32, zeros [N, G], g_idx [K]."""
    from gptqlab.quant import dequantize_codes

    offset = CheckpointFormat(fmt).zero_offset
    try:
        codes = unpack_rows(tensors["qweight"], bits).t().contiguous()
        zeros = (unpack_cols(tensors["qzeros"], bits) + offset).t().contiguous()
    except ValueError as exc:
        raise CheckpointError(f"packed tensors do not match {bits}-bit packing: {exc}") from exc
    scales = tensors["scales"].float().t().contiguous()
    g_idx = tensors["g_idx"].to(torch.int32)
    return QuantResult(codes, scales, zeros, g_idx, dequantize_codes(codes, scales, zeros, g_idx))


def written_desc_act(qcfg: QuantConfig) -> bool:
    """The ``desc_act`` a checkpoint made with ``qcfg`` declares. With static groups, act-order changes only
    the order GPTQ visits the columns: every group's parameters are fixed first, so ``g_idx`` stays
    k // group_size and the file means what a checkpoint without act-order means. It declares
    ``desc_act: false`` then, which engines that refuse act-order with groups (vLLM) accept."""
    return qcfg.desc_act and not qcfg.static_groups


def quantize_config_dict(qcfg: QuantConfig, method: str = "gptq") -> dict:
    """The ``quantize_config.json`` dict, with the keys AutoGPTQ, GPTQModel, optimum and vLLM read."""
    return {
        "quant_method": "gptq",
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        "desc_act": written_desc_act(qcfg),
        "sym": qcfg.sym,
        "static_groups": qcfg.static_groups,
        "true_sequential": qcfg.true_sequential,
        "damp_percent": qcfg.damp_percent,
        "lm_head": False,
        "checkpoint_format": qcfg.checkpoint_format,
        "format": qcfg.checkpoint_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"gptqlab:{__version__}"], "method": method, "mse": qcfg.mse},
    }
