"""The inline PTX of kernels/dequant.py, executed by a small emulator of its eight instructions.

No GPU runs the PTX in CI, and the interpreter runs the pure-Triton twin instead, so this test checks
the PTX text itself: operand numbering, lane masks, magic numbers, the 1/m constants and the order of
operations. Each instruction is emulated with its PTX semantics (f16x2: two IEEE half lanes, each result
rounded once to nearest even; the products and sums here are exact in float64 before that rounding),
on random words, zero points and scales; every lane must equal the definition, ``q - z`` or
``fp16((q - z) * s)``, bit for bit.
"""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests: triton's mode is set at first import

import numpy as np
import pytest

pytest.importorskip("triton")

from gptqlab.kernels.dequant import dequant_asm


def _halves(word: int) -> np.ndarray:
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16)


def _word(lanes: np.ndarray) -> int:
    lo, hi = lanes.astype(np.float16).view(np.uint16).astype(np.uint32)
    return int(lo) | (int(hi) << 16)


def run_ptx(ptx: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute the asm block on 32-bit register values; ``operands`` maps "$i" to its value."""
    regs = dict(operands)

    def value(token: str) -> int:
        token = token.strip()
        return regs[token] if token in regs else int(token, 0)

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            out = value(src[0])
        elif op == "shr.u32":
            out = value(src[0]) >> value(src[1])
        elif op == "lop3.b32":
            assert src[3] == "0xea"  # (a & b) | c
            out = (value(src[0]) & value(src[1])) | value(src[2])
        elif op in ("sub.rn.f16x2", "mul.rn.f16x2", "fma.rn.f16x2"):
            a, b = (_halves(value(s)).astype(np.float64) for s in src[:2])
            if op == "sub.rn.f16x2":
                exact = a - b
            elif op == "mul.rn.f16x2":
                exact = a * b
            else:
                exact = a * b + _halves(value(src[2])).astype(np.float64)
            out = _word(exact.astype(np.float16))  # one rounding to nearest even per lane
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[dst] = out & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_inline_ptx_computes_the_definition_in_every_lane(bits, scaled):
    ptx, constraints = dequant_asm(bits, scaled)
    codes = 16 // bits
    per_byte = 8 // bits
    assert constraints.count("=r") == codes and constraints.count(",r") + constraints.startswith("r") == (
        1 + scaled + per_byte
    )
    assert re.findall(r"\$\d+", ptx)  # operands are referenced
    rng = np.random.default_rng(bits * 2 + scaled)
    for _ in range(300):
        halves = rng.integers(0, 2**16, size=2, dtype=np.uint32)  # lane 0 and lane 1: two elements
        zeros = rng.integers(0, 2**bits + 1, size=2)  # z up to 2**bits (a v1 file's 256 at 8 bits)
        scales = (rng.random(2) * 0.02 + 1e-4).astype(np.float16)
        zf = zeros.astype(np.float16)
        # the zero operands as _dequantize_halves_asm builds them: 1024 + z, then -(1024/m + z) per slot
        zero_ops = [zf + np.float16(1024)] + [-(zf + np.float16(1024 >> (bits * s))) for s in range(1, per_byte)]
        ins = [int(halves[0]) | (int(halves[1]) << 16)] + ([_word(scales)] if scaled else [])
        ins += [_word(z) for z in zero_ops]
        operands = {f"${codes + i}": v for i, v in enumerate(ins)}
        regs = run_ptx(ptx, operands)
        for j in range(codes):
            got = _halves(regs[f"${j}"])
            q = (halves >> (bits * j)) & ((1 << bits) - 1)
            diff = (q.astype(np.int64) - zeros).astype(np.float64)
            want = (diff * scales.astype(np.float64)).astype(np.float16) if scaled else diff.astype(np.float16)
            assert got.view(np.uint16).tolist() == want.view(np.uint16).tolist(), (bits, scaled, j, halves, zeros)
