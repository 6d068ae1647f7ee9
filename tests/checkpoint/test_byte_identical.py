"""The format code writes the same bytes as before the architecture change of issue 9.

:data:`EXPECTED` holds SHA-256 digests computed with the code of commit eef33b8 (``gptqlab/format.py``,
``quant/pack.py``) by running :func:`digests` there:

    git archive eef33b8 | tar -x -C OLD   # then lay quant/ kernels/ calib/ benchmarks/ under OLD/gptqlab/
    PYTHONPATH=OLD python -c "import sys; sys.path.insert(0, 'tests/checkpoint'); import test_byte_identical as t; \\
        from gptqlab.format import to_checkpoint, quantize_config_dict; from gptqlab.quant import QuantConfig, \\
        QuantResult; print(t.digests(to_checkpoint, quantize_config_dict, QuantConfig, QuantResult))"

A digest covers every tensor's name, dtype, shape and bytes, or the JSON text of a config dict.
"""

from __future__ import annotations

import hashlib
import json

import torch

# (bits, checkpoint format, sym, act-order, bias) for a [N=64, K=128] weight in groups of 32
CASES = [
    (4, "gptq", True, False, False),
    (4, "gptq", True, True, True),
    (3, "gptq", False, False, False),
    (2, "gptq_v2", False, True, False),
    (8, "gptq", False, False, True),
    (8, "gptq_v2", True, False, False),
]
# (bits, group size, desc_act, static_groups, sym, checkpoint format, method)
CONFIGS = [
    (4, 128, False, False, True, "gptq", "gptq"),
    (3, 64, True, False, False, "gptq_v2", "rtn"),
    (8, -1, False, False, True, "gptq", "gptq"),
]
EXPECTED = {
    "w4 gptq sym=True act=False bias=False": "186bb7420571524bd84b25d9633cb505488e6233a4b03f5cdf3345f503f0df4f",
    "w4 gptq sym=True act=True bias=True": "325287fe502ac889d70b89a11f4b9334b17cfec68439b2f0d505ced3bf862e25",
    "w3 gptq sym=False act=False bias=False": "08844d19cbfaeec75460febc05ab0aac1f0541e910db1de7d101accbb36c7d32",
    "w2 gptq_v2 sym=False act=True bias=False": "02ea353bca1bbc66010673efe8715875e0501d0de73ccc8cc308fa4d8b250406",
    "w8 gptq sym=False act=False bias=True": "14cf8444fec15a84ee45d9c98ea2f5690ad56c1c58b801c176c5ab567859bac8",
    "w8 gptq_v2 sym=True act=False bias=False": "38b0aa23a6f597db56df0414efd2fc12e7632322a13b448c757640bc7b91d988",
    "config w4 128 False False True gptq gptq": "491490357648dc81fb2b80ab3199be33a12bcf34650a7635f315173202dc11cc",
    "config w3 64 True False False gptq_v2 rtn": "86e3981498918135998f7489afd238f1e5a5109ec9e1cd4d73c43c0f59ea1da5",
    "config w8 -1 False False True gptq gptq": "c896392e0c878d9645ea0f8b6430f779d0a7936ee934cce5ff20164feb88ad87",
}


def _result(QuantResult, bits: int, sym: bool, act_order: bool, case: int):
    g = torch.Generator().manual_seed(case)
    n, k, gs = 64, 128, 32
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32)
    if sym:
        zeros = torch.full((n, k // gs), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, 2**bits, (n, k // gs), generator=g, dtype=torch.int32)
    scales = torch.rand(n, k // gs, generator=g) * 0.01 + 1e-4
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    q = scales[:, g_idx.long()] * (codes.float() - zeros[:, g_idx.long()].float())
    return QuantResult(codes, scales, zeros, g_idx, q)


def _digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digests(to_checkpoint, quantize_config_dict, QuantConfig, QuantResult) -> dict[str, str]:
    """Digest of each case's file tensors and each config's dict, with the given implementation."""
    out = {}
    for i, (bits, fmt, sym, act_order, with_bias) in enumerate(CASES):
        res = _result(QuantResult, bits, sym, act_order, i)
        bias = torch.linspace(-1, 1, 64) if with_bias else None
        out[f"w{bits} {fmt} sym={sym} act={act_order} bias={with_bias}"] = _digest_tensors(
            to_checkpoint(res, bits, fmt, bias)
        )
    for bits, gs, desc_act, static, sym, fmt, method in CONFIGS:
        cfg = QuantConfig(
            bits=bits, group_size=gs, desc_act=desc_act, static_groups=static, sym=sym, checkpoint_format=fmt
        )
        text = json.dumps(quantize_config_dict(cfg, method), indent=2, ensure_ascii=False)
        out[f"config w{bits} {gs} {desc_act} {static} {sym} {fmt} {method}"] = hashlib.sha256(text.encode()).hexdigest()
    return out


def test_format_writes_the_bytes_of_eef33b8():
    from gptqlab.checkpoint.format import quantize_config_dict, to_checkpoint
    from gptqlab.quant import QuantConfig, QuantResult

    assert digests(to_checkpoint, quantize_config_dict, QuantConfig, QuantResult) == EXPECTED
