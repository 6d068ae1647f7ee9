"""Perplexity for the benchmarks: the names they import, now defined in :mod:`gptqlab.evaluate` (the
library behind ``gptqlab eval ppl``). Import them from there; this module keeps them importable."""

from gptqlab.evaluate import FIELDS, check_context, eval_texts, load_and_score, model_label, score

__all__ = ["FIELDS", "check_context", "eval_texts", "load_and_score", "model_label", "score"]
