"""The chunk tree: one order of summation for the Hessian, whatever the number of ranks.

Calibration samples are cut into C *chunks*: contiguous sample ranges of a fixed size (a whole number of the
driver's forward batches, as few as keep C at most the driver's ``MAX_CHUNKS``) that does not depend on the
number of ranks. Chunk c contributes the partial sum
P_c = X_cᵀ X_c [K, K] (float32) of the Linear's inputs X_c [T_c, K]. The canonical sum S is the pairwise sum
over a binary tree on the chunk indices, padded to a power of two:

    node(0, j) = P_j                                    a leaf
    node(k, j) = node(k-1, 2j) + node(k-1, 2j+1)        both children cover chunks
    node(k, j) = node(k-1, 2j)                          the right child starts at or after C
    S = node(R, 0),   R = ceil(log2 C)

Node (k, j) covers chunks [j·2^k, min((j+1)·2^k, C)). Every addition is fixed by this definition, and float
addition is commutative, so whoever computes a node (one process streaming all chunks, or a rank that holds
some of them) gets the same bits.

Ranks own contiguous ranges of chunks (:func:`rank_chunks`). A rank that owns [lo, hi) ends with the maximal
nodes that lie inside its range, its *cover* (:func:`cover`, at most 2·log2 C nodes; one node when the range
is dyadic, e.g. 16 chunks on 4 ranks). The rank that owns a Linear pushes every rank's cover, in chunk order,
into one :class:`PairwiseSum`, which adds them up the same tree: its S equals the single-process S bit for
bit, for any number of ranks, powers of two or not.

Cost: one K×K addition per chunk, as for a running sum, but up to R + 1 K×K buffers (the stack) instead of
one: 5 for 16 chunks (2.4 GB for LLaMA-7B's down_proj, K = 11008, in float32).

Nothing here communicates; :mod:`gptqlab.quantize.distributed.context` moves the nodes between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def root_level(num_chunks: int) -> int:
    """R = ceil(log2 C): the level of the root of the tree over ``num_chunks`` >= 1 chunks."""
    if num_chunks < 1:
        raise ValueError(f"the chunk tree needs at least one chunk, got {num_chunks}")
    return (num_chunks - 1).bit_length()


def node_end(level: int, index: int, num_chunks: int) -> int:
    """One past the last chunk that node (level, index) covers."""
    return min((index + 1) << level, num_chunks)


def chunk_ranges(nsamples: int, chunk_size: int) -> list[range]:
    """The samples of each chunk: [c·chunk_size, min((c+1)·chunk_size, nsamples)) for c = 0 .. C-1."""
    if nsamples < 1 or chunk_size < 1:
        raise ValueError(f"need nsamples >= 1 and chunk_size >= 1, got {nsamples} and {chunk_size}")
    return [range(s, min(s + chunk_size, nsamples)) for s in range(0, nsamples, chunk_size)]


def rank_chunks(num_chunks: int, world: int, rank: int) -> range:
    """The contiguous chunks that ``rank`` of ``world`` owns: [rank·C // world, (rank+1)·C // world).

    Sizes differ by at most one; ranks beyond C own none. Rank order is chunk order, so concatenating the
    ranks' chunks in rank order gives the samples in their original order.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0 .. {world - 1}")
    return range(rank * num_chunks // world, (rank + 1) * num_chunks // world)


def rank_samples(nsamples: int, chunk_size: int, world: int, rank: int) -> range:
    """The calibration samples of ``rank``'s chunks: a contiguous range (empty when it owns no chunk)."""
    chunks = rank_chunks(len(chunk_ranges(nsamples, chunk_size)), world, rank)
    return range(min(chunks.start * chunk_size, nsamples), min(chunks.stop * chunk_size, nsamples))


def cover(lo: int, hi: int, num_chunks: int) -> list[tuple[int, int]]:
    """The maximal tree nodes (level, index) inside chunks [lo, hi), in chunk order: what a
    :class:`PairwiseSum` that was given the leaves lo .. hi-1 holds at the end."""
    if not 0 <= lo <= hi <= num_chunks:
        raise ValueError(f"chunks [{lo}, {hi}) are not within 0 .. {num_chunks}")
    top = root_level(num_chunks)
    nodes = []
    pos = lo
    while pos < hi:
        k = 0
        # Grow while the parent starts here too and its (clipped) span stays inside [lo, hi).
        while k < top and pos % (2 << k) == 0 and node_end(k + 1, pos >> (k + 1), num_chunks) <= hi:
            k += 1
        nodes.append((k, pos >> k))
        pos = node_end(k, pos >> k, num_chunks)
    return nodes


@dataclass
class Node:
    """A tree node: its position, the sum of its chunks' partials, and how many tokens went into them."""

    level: int
    index: int
    value: torch.Tensor
    tokens: int

    @property
    def start(self) -> int:
        return self.index << self.level


class PairwiseSum:
    """A streaming sum over the chunk tree (see the module docstring).

    Push nodes in chunk order, starting at chunk ``start``, each beginning where the previous one ended:
    leaves (:meth:`add_leaf`) on a rank that computes partials, or whole nodes (:meth:`push`) on the rank that
    combines covers. A node is merged with its left sibling as soon as both are present and promoted as
    soon as its right sibling is known to be empty, so the stack holds one node per level at most.

    Merging adds the right node into the left node's tensor in place: pushed tensors become the sum's own.
    """

    def __init__(self, num_chunks: int, start: int = 0):
        self.num_chunks = num_chunks
        self.top = root_level(num_chunks)
        if not 0 <= start <= num_chunks:
            raise ValueError(f"start chunk {start} is not within 0 .. {num_chunks}")
        self.next = start  # the first chunk not yet pushed
        self.stack: list[Node] = []

    def add_leaf(self, chunk: int, value: torch.Tensor, tokens: int) -> None:
        """Push chunk ``chunk``'s partial P_c [K, K], the sum over ``tokens`` tokens."""
        self.push(Node(0, chunk, value, tokens))

    def push(self, node: Node) -> None:
        if node.start != self.next or node.start >= self.num_chunks:
            raise ValueError(f"chunk tree: expected a node that starts at chunk {self.next}, got one at {node.start}")
        self.next = node_end(node.level, node.index, self.num_chunks)
        while node.level < self.top:
            k, j = node.level, node.index
            if j % 2 == 1:  # a right child: merge with its left sibling if this sum holds it
                left = self.stack[-1] if self.stack else None
                if left is None or (left.level, left.index) != (k, j - 1):
                    break
                self.stack.pop()
                node = Node(k + 1, j // 2, left.value.add_(node.value), left.tokens + node.tokens)
            elif (j + 1) << k >= self.num_chunks:  # a left child whose right sibling covers no chunk
                node = Node(k + 1, j // 2, node.value, node.tokens)
            else:
                break
        self.stack.append(node)

    @property
    def nodes(self) -> list[Node]:
        """The nodes held, in chunk order: after the leaves lo .. hi-1, exactly ``cover(lo, hi, C)``."""
        return list(self.stack)

    def total(self) -> Node:
        """The root S (with its token count T); needs every chunk 0 .. C-1 pushed."""
        if len(self.stack) != 1 or self.stack[0].level != self.top or self.next != self.num_chunks:
            raise ValueError(
                f"chunk tree: the sum is incomplete (chunks up to {self.next} of {self.num_chunks} pushed, "
                f"{len(self.stack)} nodes held)"
            )
        return self.stack[0]
