"""Fixtures for the calibration tests: a tiny byte-level BPE tokenizer trained offline on built-in text."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gptqlab.calib import builtin_texts

VOCAB = 1000
TRAIN_PARAGRAPHS = 2000
# Far below the 16,384-character pieces that the loader tokenizes, as with real models' tokenizers.
MODEL_MAX_LENGTH = 512


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE, vocabulary 1000, trained on the first 2000 People's Daily calibration paragraphs."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(builtin_texts("peoples-daily")[:TRAIN_PARAGRAPHS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=MODEL_MAX_LENGTH)


@pytest.fixture(scope="session")
def paragraphs() -> tuple[str, ...]:
    """300 Chinese paragraphs (about 28,000 characters) that the tokenizer was not trained on."""
    return builtin_texts("peoples-daily")[TRAIN_PARAGRAPHS : TRAIN_PARAGRAPHS + 300]
