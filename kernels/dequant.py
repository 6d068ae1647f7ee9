"""Dequantization of packed GPTQ codes in paired half-precision arithmetic, for the Triton kernels.

The packed words are read as int16 halves: half h of word (r, n) holds the ``C = 16 // BITS`` codes of
input rows ``r*PACK + h*C + j`` (j < C) at bit offset ``j*BITS``. :func:`dequantize_halves` turns a tensor
of such halves into C fp16 tensors, one per code slot j:

    SCALED=False:  q - z                exact (|q - z| <= 2**BITS); the kernel applies s after the dot
    SCALED=True:   fp16((q - z) * s)    one rounding: the reference's W rounded once to fp16

It has two implementations of the same arithmetic:

* on the GPU, PTX through ``tl.inline_asm_elementwise`` on pairs (one 32-bit register holds the halves
  of two tensor elements; every instruction works on both lanes):

  - ``lop3.b32 d, R', lanes, 0x64006400, (a & b) | c`` puts code j into the mantissa of fp16 1024, so
    the lane reads ``1024 + q·m`` with m = 2**(BITS * (j mod 8/BITS)): the magic-number conversion, no
    I2F. R' is R or R >> 8 (one shift serves the codes of the upper byte);
  - m == 1: ``sub.f16x2 d, d, zb`` with zb = 1024 + z;  m > 1: ``fma.rn.f16x2 d, d, 1/m, c_m`` with
    c_m = -(1024/m + z). Both give q - z exactly;
  - SCALED: ``mul.rn.f16x2 d, d, s``, the only rounding.

  Per 4-bit weight: (1 SHF + 4 LOP3 + 2 HADD2 + 2 HFMA2) / 8 = 1.125 instructions unscaled, 1.625 with
  4 HMUL2 (2-bit: 1.06 / 1.56; 8-bit: 1.25 / 1.75), plus the packing of zero (and scale) pairs, which
  the compiler shares between the rows of a thread that have the same column.

  Which two elements share a register is unspecified by triton (``pack=2``), so every lane uses only
  its own element's half, zero and scale (lane 1 of ``R >> 8`` holds bits 8..15 of element 1's half):
  correct for any pairing. The kernels arrange their tiles so that the pair is the two halves of one
  word, which is then one register, loaded as such and handed to the tensor cores as such.

* under ``TRITON_INTERPRET=1`` (CI on CPU, where inline PTX cannot run), a pure-Triton twin with the same
  fp16 operations per element: ``(1024 + q) - (1024 + z)``, then ``* s``. The m > 1 lanes get q - z
  through an fma with 1/m on the GPU; both forms are exact, so the values are identical.

:func:`dequantize_halves_exact` is the form for bf16 and fp32 activations: fp32 arithmetic, exact, one
rounding. Packed bf16 would need other magic numbers (bf16's 7-bit mantissa cannot hold 1024 + 16q)
and, for SCALED, a bf16 copy of the fp16 scale, which rounds it.
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from gptqlab.kernels.common import FLOAT_BIAS_BITS, bias_zeros, interpreting

MAGIC = tl.constexpr(0x6400)
"""fp16 1024.0: its mantissa has ulp 1, so OR-ing a code q < 1024 into the low bits gives 1024 + q."""


def _f16_bits(value: float) -> int:
    """The IEEE fp16 bit pattern of ``value`` (exactly representable values only)."""
    return struct.unpack("<H", struct.pack("<e", value))[0]


def dequant_asm(bits: int, scaled: bool) -> tuple[str, str]:
    """(PTX, constraints) for :func:`dequantize_halves` at ``bits``.

    Operands: outputs $0..$(C-1), one fp16 pair per code slot; then R (two int16 halves), the scale pair
    when ``scaled``, and one zero pair per code slot of a byte: zb = 1024 + z for the slot at bit 0,
    c_m = -(1024/m + z) for the slot with multiplier m = 2**(BITS*slot).
    """
    codes = 16 // bits  # codes per int16 half
    per_byte = 8 // bits  # codes per byte; the upper byte's codes come from R >> 8
    mask = (1 << bits) - 1
    r = f"${codes}"
    s = f"${codes + 1}" if scaled else None
    first_zero = codes + (2 if scaled else 1)
    zero = [f"${first_zero + i}" for i in range(per_byte)]
    # results go to temporaries first: nothing promises that an output register is not also an input
    lines = [
        "{",
        f".reg .b32 hi, magic, lanes, inv, t<{codes}>;",
        f"shr.u32 hi, {r}, 8;",
        "mov.b32 magic, 0x64006400;",
    ]
    for j in range(codes):
        byte, slot = divmod(j, per_byte)
        t = f"t{j}"
        lines.append(f"mov.b32 lanes, {(mask << (bits * slot)) * 0x10001:#010x};")
        # (src & lanes) | magic: per lane the fp16 1024 + q * m
        lines.append(f"lop3.b32 {t}, {r if byte == 0 else 'hi'}, lanes, magic, 0xea;")
        if slot == 0:
            lines.append(f"sub.rn.f16x2 {t}, {t}, {zero[0]};")  # (1024 + q) - (1024 + z) = q - z, exact
        else:
            lines.append(f"mov.b32 inv, {_f16_bits(1.0 / (1 << (bits * slot))) * 0x10001:#010x};")
            lines.append(f"fma.rn.f16x2 {t}, {t}, inv, {zero[slot]};")  # (1024 + m q)/m - (1024/m + z)
        if scaled:
            lines.append(f"mul.rn.f16x2 {t}, {t}, {s};")  # the one rounding
    lines += [f"mov.b32 ${j}, t{j};" for j in range(codes)] + ["}"]
    n_in = 1 + scaled + per_byte
    return "\n".join(lines), ",".join(["=r"] * codes + ["r"] * n_in)


ASM_2BIT, CONSTRAINTS_2BIT = (tl.constexpr(v) for v in dequant_asm(2, scaled=False))
ASM_4BIT, CONSTRAINTS_4BIT = (tl.constexpr(v) for v in dequant_asm(4, scaled=False))
ASM_8BIT, CONSTRAINTS_8BIT = (tl.constexpr(v) for v in dequant_asm(8, scaled=False))
ASM_2BIT_SCALED, CONSTRAINTS_2BIT_SCALED = (tl.constexpr(v) for v in dequant_asm(2, scaled=True))
ASM_4BIT_SCALED, CONSTRAINTS_4BIT_SCALED = (tl.constexpr(v) for v in dequant_asm(4, scaled=True))
ASM_8BIT_SCALED, CONSTRAINTS_8BIT_SCALED = (tl.constexpr(v) for v in dequant_asm(8, scaled=True))


@triton.jit
def _dequantize_halves_asm(halves, zeros, scales, BITS: tl.constexpr, SCALED: tl.constexpr):
    """GPU form of :func:`dequantize_halves`: inline PTX on pairs (see the module docstring)."""
    zf = zeros.to(tl.float16)  # exact: z <= 256
    if SCALED:
        if BITS == 4:
            args = [halves, scales, zf + 1024.0, -(zf + 64.0)]
            return tl.inline_asm_elementwise(ASM_4BIT_SCALED, CONSTRAINTS_4BIT_SCALED, args, (tl.float16,) * 4, True, 2)
        elif BITS == 2:
            args = [halves, scales, zf + 1024.0, -(zf + 256.0), -(zf + 64.0), -(zf + 16.0)]
            return tl.inline_asm_elementwise(ASM_2BIT_SCALED, CONSTRAINTS_2BIT_SCALED, args, (tl.float16,) * 8, True, 2)
        else:
            args = [halves, scales, zf + 1024.0]
            return tl.inline_asm_elementwise(ASM_8BIT_SCALED, CONSTRAINTS_8BIT_SCALED, args, (tl.float16,) * 2, True, 2)
    else:
        if BITS == 4:
            args = [halves, zf + 1024.0, -(zf + 64.0)]
            return tl.inline_asm_elementwise(ASM_4BIT, CONSTRAINTS_4BIT, args, (tl.float16,) * 4, True, 2)
        elif BITS == 2:
            args = [halves, zf + 1024.0, -(zf + 256.0), -(zf + 64.0), -(zf + 16.0)]
            return tl.inline_asm_elementwise(ASM_2BIT, CONSTRAINTS_2BIT, args, (tl.float16,) * 8, True, 2)
        else:
            args = [halves, zf + 1024.0]
            return tl.inline_asm_elementwise(ASM_8BIT, CONSTRAINTS_8BIT, args, (tl.float16,) * 2, True, 2)


@triton.jit
def _code_twin(halves, zb, scales, J: tl.constexpr, BITS: tl.constexpr, SCALED: tl.constexpr):
    """Interpreter form of one code slot: (1024 + q) - (1024 + z), then * s, each step in fp16."""
    q = (halves.to(tl.int32) >> (J * BITS)) & ((1 << BITS) - 1)
    w = (q | MAGIC).to(tl.int16).to(tl.float16, bitcast=True) - zb
    if SCALED:
        w = w * scales
    return w


@triton.jit
def _dequantize_halves_twin(halves, zeros, scales, BITS: tl.constexpr, SCALED: tl.constexpr):
    """CPU-interpreter form of :func:`dequantize_halves`: the same fp16 operations, one element at a time."""
    zb = zeros.to(tl.float16) + 1024.0
    if BITS == 4:
        return (
            _code_twin(halves, zb, scales, 0, BITS, SCALED),
            _code_twin(halves, zb, scales, 1, BITS, SCALED),
            _code_twin(halves, zb, scales, 2, BITS, SCALED),
            _code_twin(halves, zb, scales, 3, BITS, SCALED),
        )
    elif BITS == 2:
        return (
            _code_twin(halves, zb, scales, 0, BITS, SCALED),
            _code_twin(halves, zb, scales, 1, BITS, SCALED),
            _code_twin(halves, zb, scales, 2, BITS, SCALED),
            _code_twin(halves, zb, scales, 3, BITS, SCALED),
            _code_twin(halves, zb, scales, 4, BITS, SCALED),
            _code_twin(halves, zb, scales, 5, BITS, SCALED),
            _code_twin(halves, zb, scales, 6, BITS, SCALED),
            _code_twin(halves, zb, scales, 7, BITS, SCALED),
        )
    else:
        return _code_twin(halves, zb, scales, 0, BITS, SCALED), _code_twin(halves, zb, scales, 1, BITS, SCALED)


@triton.jit
def dequantize_halves(halves, zeros, scales, BITS: tl.constexpr, SCALED: tl.constexpr, USE_ASM: tl.constexpr):
    """fp16 weights from int16 halves of packed words: a tuple of 16 // BITS tensors, slot j holding
    ``q_j - z`` (exact) or, if SCALED, ``fp16((q_j - z) * s)`` for the code at bit offset ``j*BITS``.

    halves: int16, any shape; zeros: integer zero points, scales: fp16 (unused unless SCALED), both
    broadcastable to halves. USE_ASM: packed PTX (GPU) or the pure-Triton twin (interpreter); the values
    are identical.
    """
    if USE_ASM:
        return _dequantize_halves_asm(halves, zeros, scales, BITS, SCALED)
    else:
        return _dequantize_halves_twin(halves, zeros, scales, BITS, SCALED)


def use_asm() -> bool:
    """True when the kernels are compiled for a GPU (inline PTX); False under the CPU interpreter."""
    return not interpreting()


@triton.jit
def _code_exact(halves, zb, scales, J: tl.constexpr, BITS: tl.constexpr, DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """One code slot in fp32, exact, rounded once to DTYPE (see :func:`dequantize_halves_exact`)."""
    q = (halves.to(tl.int32) >> (J * BITS)) & ((1 << BITS) - 1)
    # int -> fp32 through the mantissa of 2**23 (OR, then one subtraction that also removes z): no I2F
    w = (q | FLOAT_BIAS_BITS).to(tl.float32, bitcast=True) - zb
    if SCALED:
        w = w * scales
    return w.to(DTYPE)


@triton.jit
def dequantize_halves_exact(halves, zeros, scales, BITS: tl.constexpr, DTYPE: tl.constexpr, SCALED: tl.constexpr):
    """:func:`dequantize_halves` for bf16 and fp32 activations: ``DTYPE(q - z)`` (exact: |q - z| <= 256) or,
    if SCALED, ``DTYPE(fp32(s) * fp32(q - z))``, exact before its one rounding like the reference. About
    four fp32/integer operations per weight."""
    zb = bias_zeros(zeros)
    s = scales.to(tl.float32)
    if BITS == 4:
        return (
            _code_exact(halves, zb, s, 0, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 1, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 2, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 3, BITS, DTYPE, SCALED),
        )
    elif BITS == 2:
        return (
            _code_exact(halves, zb, s, 0, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 1, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 2, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 3, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 4, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 5, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 6, BITS, DTYPE, SCALED),
            _code_exact(halves, zb, s, 7, BITS, DTYPE, SCALED),
        )
    else:
        return _code_exact(halves, zb, s, 0, BITS, DTYPE, SCALED), _code_exact(halves, zb, s, 1, BITS, DTYPE, SCALED)


@triton.jit
def dot_row_order(xt, BLOCK_M: tl.constexpr, BLOCK_KP: tl.constexpr, C: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] in input order -> the row order of :func:`weight_tile`.

    Input row r*PACK + h*C + slot (word row r, half h, code slot) becomes row (r, slot bits reversed, h):
    h is the least significant so that rows 2i and 2i + 1 are the two halves of one word at one slot,
    which the packed dequantization leaves in one 32-bit register, as a tensor-core operand register
    wants them; tl.join puts its first operand at index 0 of a new minor axis and the slots are joined
    pairwise, so slot bit 0 is the most significant of the slot index.
    """
    if C == 2:
        xt = tl.reshape(xt, (BLOCK_M, BLOCK_KP, 2, 2))  # (m, r, h, slot)
        xt = tl.permute(xt, (0, 1, 3, 2))
    elif C == 4:
        xt = tl.reshape(xt, (BLOCK_M, BLOCK_KP, 2, 2, 2))  # (m, r, h, slot bit 1, slot bit 0)
        xt = tl.permute(xt, (0, 1, 4, 3, 2))
    else:
        xt = tl.reshape(xt, (BLOCK_M, BLOCK_KP, 2, 2, 2, 2))  # (m, r, h, slot bits 2, 1, 0)
        xt = tl.permute(xt, (0, 1, 5, 4, 3, 2))
    return tl.reshape(xt, (BLOCK_M, BLOCK_KP * 2 * C))


@triton.jit
def _join_slots(w, C: tl.constexpr):
    """Join the C code slots [BLOCK_KP, BLOCK_N, 2] into one [BLOCK_KP, BLOCK_N, 2, C] tensor (C in 2, 4, 8),
    pairwise: slot bit 0 ends up most significant on the new axes."""
    if C == 2:
        return tl.join(w[0], w[1])
    elif C == 4:
        return tl.join(tl.join(w[0], w[1]), tl.join(w[2], w[3]))
    else:
        return tl.join(
            tl.join(tl.join(w[0], w[1]), tl.join(w[2], w[3])), tl.join(tl.join(w[4], w[5]), tl.join(w[6], w[7]))
        )


@triton.jit
def weight_tile(w, BLOCK_KP: tl.constexpr, BLOCK_N: tl.constexpr, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The dot operand from the C code slots [BLOCK_KP, BLOCK_N, 2] of a tile: [BLOCK_K, BLOCK_N], or
    [BLOCK_N, BLOCK_K] if TRANSPOSED. The half axis moves behind the slot axes, the column axis last (first
    if TRANSPOSED); then the rows flatten (see :func:`dot_row_order`). Register relabelling only: every
    32-bit register of the dequantized slots becomes one tensor-core operand register."""
    joined = _join_slots(w, C)  # [BLOCK_KP, BLOCK_N, 2 (half), 2, .. (slot bits)]
    if TRANSPOSED:
        if C == 2:
            joined = tl.permute(joined, (1, 0, 3, 2))
        elif C == 4:
            joined = tl.permute(joined, (1, 0, 3, 4, 2))
        else:
            joined = tl.permute(joined, (1, 0, 3, 4, 5, 2))
        return tl.reshape(joined, (BLOCK_N, BLOCK_KP * 2 * C))
    else:
        if C == 2:
            joined = tl.permute(joined, (0, 3, 2, 1))
        elif C == 4:
            joined = tl.permute(joined, (0, 3, 4, 2, 1))
        else:
            joined = tl.permute(joined, (0, 3, 4, 5, 2, 1))
        return tl.reshape(joined, (BLOCK_KP * 2 * C, BLOCK_N))
