"""Quantization under ``torchrun``: calibration chunks split across ranks, Hessians reduced in an order that
does not depend on the number of ranks, each Linear solved by one rank and its result shared.

:mod:`~gptqlab.quantize.distributed.tree` holds the arithmetic (the chunk tree; nothing communicates),
:mod:`~gptqlab.quantize.distributed.context` the ranks and the transfers between them. Without torchrun every
operation is local and no process group is started.
"""

from gptqlab.quantize.distributed.context import (
    DEFAULT_TIMEOUT,
    Distributed,
    HessianSum,
    RankFailure,
    RemoteError,
    Solved,
    assign_owners,
)
from gptqlab.quantize.distributed.tree import (
    PairwiseSum,
    chunk_ranges,
    cover,
    rank_chunks,
    rank_samples,
    root_level,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Distributed",
    "HessianSum",
    "PairwiseSum",
    "RankFailure",
    "RemoteError",
    "Solved",
    "assign_owners",
    "chunk_ranges",
    "cover",
    "rank_chunks",
    "rank_samples",
    "root_level",
]
