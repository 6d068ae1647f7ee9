"""Calibration data: turns sources (built-in Chinese text, BELLE, plain text, Hugging Face datasets) into
token tensors for GPTQ, and evaluation text for perplexity. Nothing here knows about models or Hessians."""

from gptqlab.calib.loader import CalibSet, load_calibration, load_eval_text
from gptqlab.calib.sources import BUILTIN_SOURCES, builtin_texts
from gptqlab.calib.spec import SourceSpec, parse_spec

__all__ = [
    "BUILTIN_SOURCES",
    "CalibSet",
    "SourceSpec",
    "builtin_texts",
    "load_calibration",
    "load_eval_text",
    "parse_spec",
]
