"""The small Chinese models that ship inside gptqlab, and how a model name becomes a path.

They are trained from scratch by ``python tools/train_embedded.py`` and live in
``gptqlab/models/<name>/`` (package data): safetensors weights, config, tokenizer, ``eval.json`` with
their measured perplexities, and a model card.
"""

from __future__ import annotations

from pathlib import Path

from gptqlab.errors import GptqlabError


def models_dir() -> Path:
    """The folder that holds the embedded models, ``gptqlab/models/``."""
    return Path(__file__).resolve().parent / "models"


EMBEDDED_MODELS: dict[str, Path] = {name: models_dir() / name for name in ("tiny-zh-llama", "tiny-zh-bloom")}


def resolve_model(name_or_path: str) -> str:
    """Where transformers should load ``name_or_path`` from.

    An embedded model's name gives its folder; an existing local directory is returned as it is; anything
    else is returned unchanged, for transformers to treat as a Hub id.
    """
    if name_or_path in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[name_or_path]
        if not (folder / "config.json").is_file():
            raise GptqlabError(
                f"embedded model {name_or_path!r} is not built: in a gptqlab source checkout, run "
                f"python tools/train_embedded.py --model {name_or_path}"
            )
        return str(folder)
    return name_or_path
