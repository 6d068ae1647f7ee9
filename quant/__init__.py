"""The GPTQ algorithm and its round-to-nearest baseline, as pure functions over tensors.

The solvers (:mod:`~gptqlab.quant.gptq_solve`, :mod:`~gptqlab.quant.round_to_nearest`) are imported on
first use, so that loading a checkpoint, which needs only the config, the result type and packing, imports
no quantizer code (``tests/test_imports.py``).
"""

from __future__ import annotations

import importlib

from gptqlab.quant.config import QuantConfig
from gptqlab.quant.quantizer import choose_qparams, dequantize, quantize
from gptqlab.quant.result import QuantResult, dequantize_codes, weighted_error

_SOLVERS = {
    "HessianFactor": "gptq_solve",
    "NumericalError": "gptq_solve",
    "gptq": "gptq_solve",
    "gptq_reference": "gptq_solve",
    "hessian_factor": "gptq_solve",
    "inverse_hessian_cholesky": "gptq_solve",
    "rtn": "round_to_nearest",
}


def __getattr__(name: str):
    if name in _SOLVERS:
        value = getattr(importlib.import_module(f"gptqlab.quant.{_SOLVERS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptqlab.quant' has no attribute {name!r}")


__all__ = [
    "HessianFactor",
    "NumericalError",
    "QuantConfig",
    "QuantResult",
    "choose_qparams",
    "dequantize",
    "dequantize_codes",
    "gptq",
    "gptq_reference",
    "hessian_factor",
    "inverse_hessian_cholesky",
    "quantize",
    "rtn",
    "weighted_error",
]
