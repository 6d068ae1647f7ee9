"""The Triton kernels (gemm, gemv) against the torch reference and the exact product.

By default they run in triton's CPU interpreter: TRITON_INTERPRET=1 is set below, before triton is
imported. There the fp16 dequantization runs as its pure-Triton twin (kernels/dequant.py), the same
fp16 operations as the GPU's inline PTX. On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/kernels``
runs the compiled kernels with the PTX.

Shapes: K = 352 = 2*128 + 96, so the last K tile of both kernels is partial and the last group of 128 is
short; N = 200 is not a multiple of any N tile. Interpreter tiles: gemm 32 x 64 with 16 packed rows;
gemv 64 columns x 16 packed rows (a K tile of 64, 128 or 256 rows for 8, 4 or 2 bits) with SPLIT_K = 2,
so the split-K reduction in the kernel runs for every bit width. Group sizes 32 (scales per word row,
W rounded to x.dtype before the dot) and 128 / -1 (one scales row per tile for 4 and 8 bits: q - z in
the dot, scales after it; per word row for 2 bits) reach both numerics of both kernels.

Tolerances: against the reference (W rounded to x.dtype, fp32 sums) outputs agree to one rounding of
the output dtype scaled by the largest output (rtol = eps, atol = eps * max|ref|); against the exact
fp64 product, the one-group path is within one rounding (rtol = eps) and the other within the rounding
of W (eps/2 * sum |x W|) plus one. An off-by-one zero point or a wrong group changes outputs by ~100x that.
"""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton
from synth_layers import assert_within_one_ulp, check_interpreter_mode, make_layer, patch_interpreter_bf16

from gptqlab.kernels import gemm as gemm_module
from gptqlab.kernels import gemv as gemv_module
from gptqlab.kernels import gptq_matmul, reference
from gptqlab.kernels.dequant import dequant_asm
from gptqlab.kernels.gemm import gemm
from gptqlab.kernels.gemv import gemv

check_interpreter_mode()
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

K, N = 352, 200
HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _bf16_like_gpu(monkeypatch):
    patch_interpreter_bf16(monkeypatch)


def _operands(layer, device=DEVICE):
    """(qweight, zeros, scales, bias) in the kernels' layout, zeros as uint8 like QuantLinear keeps them."""
    return (
        layer.qweight().to(device),
        layer.zeros.to(torch.uint8).to(device),
        layer.scales.to(device),
        None if layer.bias is None else layer.bias.to(device),
    )


def _x(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemm_matches_reference(bits, group_size, m, dtype):
    layer = make_layer(bits, K, N, group_size, seed=bits)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(m, K, dtype)
    out = gemm(x, qweight, zeros, scales, bits, group_size, bias)
    ref = reference.matmul_contiguous(x, qweight, zeros, scales, bits, group_size, bias)
    assert_within_one_ulp(out, ref)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemv_matches_reference(bits, group_size, m, dtype):
    layer = make_layer(bits, K, N, group_size, seed=bits)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(m, K, dtype)
    out = gemv(x, qweight, zeros, scales, bits, group_size, bias)
    ref = reference.matmul_contiguous(x, qweight, zeros, scales, bits, group_size, bias)
    assert_within_one_ulp(out, ref)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemm_dequantizes_bit_exactly(bits, dtype):
    # x = I_K makes out = W: one nonzero product per output, exact in fp32, so any difference is in W
    layer = make_layer(bits, K, N, 32, bias=False, seed=bits)
    qweight, zeros, scales, _ = _operands(layer)
    eye = torch.eye(K, dtype=dtype, device=DEVICE)
    out = gemm(eye, qweight, zeros, scales, bits, 32)
    assert torch.equal(out.cpu(), layer.weight().to(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemv_dequantizes_bit_exactly(bits, m, dtype):
    # rows of the identity from the last, partial K tile select rows of W exactly
    layer = make_layer(bits, K, N, 128, bias=False, seed=bits)
    qweight, zeros, scales, _ = _operands(layer)
    rows = torch.arange(K - m, K)
    x = torch.eye(K, dtype=dtype)[rows].to(DEVICE)
    out = gemv(x, qweight, zeros, scales, bits, 128)
    assert torch.equal(out.cpu(), layer.weight()[rows].to(dtype))


@pytest.mark.parametrize("m", [1, 3, 33])
def test_float32_activations_are_not_rounded_to_tf32(m):
    layer = make_layer(4, K, N, 128)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(m, K, torch.float32)
    out = gptq_matmul(x, qweight, zeros, scales, 4, 128, bias, backend="triton")
    ref = reference.matmul_contiguous(x, qweight, zeros, scales, 4, 128, bias)
    # GPU: tf32x3 products, ~1e-6 relative (plain tf32 would be ~1e-3); the interpreter multiplies in fp32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 33])
def test_without_bias_and_with_strided_x(m):
    layer = make_layer(8, K, N, 32, bias=False)
    qweight, zeros, scales, _ = _operands(layer)
    wide = _x(m, 2 * K, torch.float16)
    x = wide[:, ::2]  # stride (2K, 2)
    out = gptq_matmul(x, qweight, zeros, scales, 8, 32, backend="triton")
    ref = reference.matmul_contiguous(x, qweight, zeros, scales, 8, 32)
    assert_within_one_ulp(out, ref)


def test_gemv_split_without_work_adds_nothing():
    # K = 256 is one 2-bit tile of 16 packed rows: the second of the two K slices has no tile
    layer = make_layer(2, 256, N, 64)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(1, 256, torch.float16)
    out = gemv(x, qweight, zeros, scales, 2, 64, bias)
    assert_within_one_ulp(out, reference.matmul_contiguous(x, qweight, zeros, scales, 2, 64, bias))


def test_dispatcher_flattens_leading_dims_and_picks_kernel():
    layer = make_layer(4, K, N, 128)
    qweight, zeros, scales, bias = _operands(layer)
    for shape in [(2, 3, K), (5, 7, K)]:  # 6 rows: gemv; 35 rows: gemm
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(torch.float16).to(DEVICE)
        out = gptq_matmul(x, qweight, zeros, scales, 4, 128, bias, backend="triton")
        assert out.shape == (*shape[:-1], N)
        ref = reference.matmul_contiguous(x, qweight, zeros, scales, 4, 128, bias)
        assert_within_one_ulp(out, ref)


def test_empty_batch_returns_empty():
    layer = make_layer(4, K, N, 128)
    qweight, zeros, scales, bias = _operands(layer)
    for kernel in (gemm, gemv):
        out = kernel(torch.empty(0, K, dtype=torch.float16, device=DEVICE), qweight, zeros, scales, 4, 128, bias)
        assert out.shape == (0, N) and out.dtype == torch.float16


def test_kernels_reject_bad_operands_with_actionable_messages(monkeypatch):
    layer = make_layer(4, K, N, 128)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(2, K, torch.float16)
    with pytest.raises(ValueError, match="K=320 columns"):
        gemm(x[:, :320], qweight, zeros, scales, 4, 128)
    with pytest.raises(ValueError, match=r"zeros must be an unpacked integer tensor \[G, N\] = \[3, 200\]"):
        gemm(x, qweight, zeros[:, :100], scales, 4, 128)
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] = \[200\]"):
        gemv(x, qweight, zeros, scales, 4, 128, bias[:10])
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(_x(17, K, torch.float16), qweight, zeros, scales, 4, 128)
    for kernel in (gemm, gemv):
        with pytest.raises(ValueError, match="group_size to be a multiple of 8"):
            kernel(x, qweight, zeros.repeat(30, 1)[:88], scales.repeat(30, 1)[:88], 4, 4)
    with pytest.raises(ValueError, match="no Triton kernel for 3-bit"):
        gemm(x, torch.zeros(K * 3 // 32, N, dtype=torch.int32, device=DEVICE), zeros, scales, 3, 128)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        gemm(x.double(), qweight, zeros, scales, 4, 128)
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            gemm(x, qweight, zeros, scales, 4, 128)


def test_autotune_pruning_keeps_useful_configs():
    def gemv_cfg(block_n, split_k, warps):
        return triton.Config({"BLOCK_N": block_n, "BLOCK_KP": 16, "SPLIT_K": split_k}, num_warps=warps)

    prune = gemv_module._prune_gemv_configs
    small, wide, split16 = gemv_cfg(64, 4, 1), gemv_cfg(128, 4, 1), gemv_cfg(64, 16, 1)
    # K = 4096 at 4 bits: 32 tiles of 128 rows, so 16 slices fit
    assert prune([small, wide, split16], {"K": 4096, "M_BUCKET": 16}, BITS=4) == [small, wide, split16]
    # K = 512: 4 tiles, so 16 slices would mostly add zeros; pruning never returns nothing
    assert prune([small, split16], {"K": 512, "M_BUCKET": 1}, BITS=4) == [small]
    assert prune([split16], {"K": 512, "M_BUCKET": 1}, BITS=4) == [split16]

    # not spilling (tests/kernels/test_compile_sm90.py): bf16 / fp32 keep at most 32 words per thread, and no
    # K tile has more than 128 inputs (16 packed rows of 2-bit codes would be 256)
    assert prune([small, wide], {"K": 4096, "M_BUCKET": 1, "PACKED_FP16": False}, BITS=4) == [small]
    narrow = triton.Config({"BLOCK_N": 128, "BLOCK_KP": 8, "SPLIT_K": 4}, num_warps=2)
    assert prune([small, narrow], {"K": 4096, "M_BUCKET": 1}, BITS=2) == [narrow]

    def gemm_cfg(block_m, block_kp=16):
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_KP": block_kp, "L2_GROUP_M": 8})

    tall, short, short_2bit = gemm_cfg(128), gemm_cfg(32), gemm_cfg(32, 8)
    prune_gemm = gemm_module._prune_gemm_configs
    assert prune_gemm([tall, short], {"M_BUCKET": 64, "BITS": 4}) == [short]
    assert prune_gemm([tall, short], {"M_BUCKET": 256, "BITS": 4}) == [tall, short]
    assert prune_gemm([tall, short], {"M_BUCKET": 256, "BITS": 4, "HAS_PERM": True}) == [short]  # x gathered
    assert prune_gemm([tall, short, short_2bit], {"M_BUCKET": 256, "BITS": 2}) == [short_2bit]


def _exact(x, layer, bias=True):
    """The exact product with the checkpoint's W in float64, and sum |x| |W| per output."""
    w = layer.weight().double()
    exact = x.double().cpu() @ w + (layer.bias.double() if bias and layer.bias is not None else 0)
    return exact, x.double().abs().cpu() @ w.abs()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_one_group_tiles_round_once_from_the_exact_product(bits, m, dtype):
    # group 128: every gemv K tile lies in one group at 4 and 8 bits, so the dot sums x * (q - z) exactly
    # (fp32 products of small integers) and the scales apply to the fp32 result: the output is the exact
    # product with the checkpoint's W, rounded once (rtol = eps; the fp32 summation error is ~2**-24)
    layer = make_layer(bits, 384, N, 128, seed=bits)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(m, 384, dtype)
    out = gemv(x, qweight, zeros, scales, bits, 128, bias)
    exact, _ = _exact(x, layer)
    torch.testing.assert_close(out.cpu().double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(("kernel", "group_size"), [("gemv", 32), ("gemm", 32), ("gemm", 128)])
def test_rounded_w_paths_stay_within_the_rounding_of_w(kernel, group_size, dtype):
    # the gemm always, and the gemv when tiles span groups, put W = x.dtype((q - z) * s) into the dot (the
    # reference's numerics): |out - exact| <= eps/2 * sum|x W| (W's rounding) + eps * |exact| (the output's)
    layer = make_layer(4, K, N, group_size, seed=5)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(3 if kernel == "gemv" else 33, K, dtype)
    out = (gemv if kernel == "gemv" else gemm)(x, qweight, zeros, scales, 4, group_size, bias)
    exact, magnitude = _exact(x, layer)
    eps = torch.finfo(dtype).eps
    assert ((out.cpu().double() - exact).abs() <= eps / 2 * magnitude + eps * exact.abs() + 1e-5).all()


@pytest.mark.parametrize("m", [1, 5, 40])
def test_act_order_permutation_is_fused_into_the_x_load(m):
    layer = make_layer(4, K, N, 32)
    qweight, zeros, scales, bias = _operands(layer)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(9)).to(torch.int32).to(DEVICE)
    x = _x(m, K, torch.float16)
    out = gptq_matmul(x, qweight, zeros, scales, 4, 32, bias, backend="triton", perm=perm)
    ref = reference.matmul_contiguous(x.index_select(-1, perm), qweight, zeros, scales, 4, 32, bias)
    assert_within_one_ulp(out, ref)
    torch_path = gptq_matmul(x, qweight, zeros, scales, 4, 32, bias, backend="torch", perm=perm)
    assert torch.equal(torch_path, ref)
    with pytest.raises(ValueError, match=r"perm must have shape \[K\] = \[352\]"):
        gptq_matmul(x, qweight, zeros, scales, 4, 32, bias, backend="triton", perm=perm[:10])


def test_split_k_counters_reset_so_repeated_calls_agree_bit_for_bit():
    # the slice that arrives last sums the partials in slice order and resets its counter: a second call
    # (reusing the counters) gives the same bits, and the counters are back at zero
    layer = make_layer(4, K, N, 128)
    qweight, zeros, scales, bias = _operands(layer)
    x = _x(4, K, torch.float16)
    first = gemv(x, qweight, zeros, scales, 4, 128, bias)
    second = gemv(x, qweight, zeros, scales, 4, 128, bias)
    assert torch.equal(first, second) and first.dtype == torch.float16
    assert int(gemv_module.counters_for(first.device, N).abs().sum()) == 0


# -- the inline PTX of kernels/dequant.py, executed by a small emulator of its instructions ----------------
# No GPU runs the PTX in CI, and the interpreter runs the pure-Triton twin instead, so this checks the PTX
# text itself: operand numbering, lane masks, magic numbers, the 1/m constants and the order of operations.
# Each instruction is emulated with its PTX semantics (f16x2: two IEEE half lanes, each result rounded once
# to nearest even; the products and sums here are exact in float64 before that rounding), on random words,
# zero points and scales; every lane must equal the definition, q - z or fp16((q - z) * s), bit for bit.


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
