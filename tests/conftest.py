"""Session fixtures built from :mod:`testkit`: the tiny tokenizer and the tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from testkit import build_model, build_tokenizer

# Without a GPU the Triton kernels run in triton's interpreter. The variable must be set before anything
# (transformers, datasets, the kernels) first imports triton, so it is set here, before any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """{'llama' | 'bloom' | 'qwen2': folder of a 2-layer random model with the tiny tokenizer}."""
    root = tmp_path_factory.mktemp("models")
    return {a: build_model(root / a, a, tokenizer_dir) for a in ("llama", "bloom", "qwen2")}
