"""The GPTQ algorithm and its round-to-nearest baseline, as pure functions over tensors."""

from gptqlab.quant.config import QuantConfig
from gptqlab.quant.gptq import (
    HessianFactor,
    NumericalError,
    gptq,
    gptq_reference,
    hessian_factor,
    inverse_hessian_cholesky,
)
from gptqlab.quant.quantizer import choose_qparams, dequantize, quantize
from gptqlab.quant.result import QuantResult, dequantize_codes, weighted_error
from gptqlab.quant.rtn import rtn

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
