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

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import triton
from synth_layers import assert_within_one_ulp, check_interpreter_mode, make_layer, patch_interpreter_bf16

from gptqlab.kernels import gemm as gemm_module
from gptqlab.kernels import gemv as gemv_module
from gptqlab.kernels import gptq_matmul, reference
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
    # K = 4096 at 4 bits: 32 tiles of 128 rows, so 16 slices fit; 64 words per thread in one warp only for M = 1
    assert prune([small, wide, split16], {"K": 4096, "M_BUCKET": 1}, BITS=4) == [small, wide, split16]
    assert prune([small, wide, split16], {"K": 4096, "M_BUCKET": 16}, BITS=4) == [small, split16]
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
