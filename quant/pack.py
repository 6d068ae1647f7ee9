"""Packing of integer codes into int32 words, in the GPTQ checkpoint layout.

Every bit width uses one rule: a run of 32 codes becomes ``bits`` consecutive int32 words, read as one
little-endian bit stream. Code ``j`` of the run occupies stream bits ``[bits*j, bits*j + bits)``. For 2, 4
and 8 bits no code crosses a word, so word ``r`` holds codes ``r*(32//bits) + j`` at bit offset ``bits*j``
with the lowest index in the least significant bits. For 3 bits, codes 10 and 21 straddle word
boundaries. This is the AutoGPTQ/GPTQModel layout (docs/FORMAT.md, "Packing") for ``qweight`` (packed
along the input dimension, dim 0 of the ``[K, N]`` code matrix) and for ``qzeros`` (packed along the output
dimension, dim 1).

Each layout has exactly one pack/unpack pair, and ``unpack(pack(x)) == x`` holds bit for bit.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
"""The code widths of the format; every other module imports this tuple from here."""
_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def codes_per_run(bits: int) -> int:
    """Codes in one independent run of int32 words: 32 // bits for 2, 4 and 8 bits (one word), 32 for 3 bits
    (three words). A packed dimension must be a multiple of this."""
    _check_bits(bits)
    return 32 if bits == 3 else 32 // bits


def _words_per_run(bits: int) -> int:
    return bits if bits == 3 else 1


def packed_rows(rows: int, bits: int) -> int:
    """Number of int32 words that hold ``rows`` codes of ``bits`` bits along the packed dimension."""
    _check_bits(bits)
    if rows % codes_per_run(bits):
        raise ValueError(
            f"{rows} codes of {bits} bits do not fill whole int32 words; "
            f"the packed dimension must be a multiple of {codes_per_run(bits)}"
        )
    return rows * bits // 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along dim 0.

    codes: [R, C] integer tensor with values in [0, 2**bits). R * bits must be a multiple of 32
        (R a multiple of 32 for 3 bits).
    returns: [R * bits / 32, C] int32.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [R, C], got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    out_rows = packed_rows(rows, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits} bits")
    per_run, words_per_run = codes_per_run(bits), _words_per_run(bits)
    c = c.reshape(rows // per_run, per_run, cols)  # [runs, per_run, C]
    words = torch.zeros(rows // per_run, words_per_run, cols, dtype=torch.int64, device=codes.device)
    for j in range(per_run):
        pos = bits * j
        w, off = divmod(pos, 32)
        words[:, w] |= (c[:, j] << off) & _MASK32
        if off + bits > 32:  # the code straddles into the next word
            words[:, w + 1] |= c[:, j] >> (32 - off)
    return _to_int32(words.reshape(out_rows, cols))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`.

    packed: [R * bits / 32, C] int32.
    returns: [R, C] int32 codes in [0, 2**bits). ``rows`` (R) defaults to ``packed.shape[0] * 32 / bits``.
    """
    _check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D, got shape {tuple(packed.shape)}")
    prow, cols = packed.shape
    total = prow * 32 // bits
    rows = total if rows is None else rows
    if rows != total:
        raise ValueError(f"{prow} packed words of {bits} bits hold {total} codes, not {rows}")
    per_run, words_per_run = codes_per_run(bits), _words_per_run(bits)
    if prow % words_per_run:
        raise ValueError(f"3-bit packing needs a multiple of 3 words, got {prow}")
    w64 = packed.to(torch.int64) & _MASK32
    w64 = w64.reshape(prow // words_per_run, words_per_run, cols)
    mask = (1 << bits) - 1
    out = torch.empty(prow // words_per_run, per_run, cols, dtype=torch.int64, device=packed.device)
    for j in range(per_run):
        w, off = divmod(bits * j, 32)
        v = w64[:, w] >> off
        if off + bits > 32:
            v = v | (w64[:, w + 1] << (32 - off))
        out[:, j] = v & mask
    return out.reshape(rows, cols).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along dim 1 (the ``qzeros`` layout). codes: [R, C] → [R, C * bits / 32] int32."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`. packed: [R, C * bits / 32] int32 → [R, C] int32 codes."""
    return unpack_rows(packed.t(), bits).t().contiguous()
