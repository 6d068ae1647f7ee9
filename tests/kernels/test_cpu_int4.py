"""The CPU int4 path (gptqlab.kernels.cpu, QuantLinear.use_cpu_kernel): repacking exactness, kernel output
against the weight it represents and against the exact GPTQ reference, fallbacks, memory.

Stated tolerances (kernels/cpu.py):
- weight: codes unchanged; S and Z rounded once to bf16 (8 significant bits: rounding to nearest is off by
  at most 2**-8 relative), so per element |W_cpu - W| <= 2**-8 * sum over parts (|S| * |code - 8| + |Z|).
- output: within bf16 output rounding of bf16(x) @ W_cpu, and within 1 % (relative Frobenius norm) of the
  exact fp32 reference x @ W (measured 0.2-0.4 %).
"""

import logging

import pytest
import torch
from synth_layers import make_layer

from gptqlab import qlinear
from gptqlab.kernels import cpu, reference
from gptqlab.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(not cpu.kernel_available(), reason="this torch has no CPU int4 kernel")
K, N = 256, 160  # N = 2 blocks of 64 + a remainder block of 32


def _load(layer, zero_offset=1) -> QuantLinear:
    lin = QuantLinear.from_checkpoint(**layer.checkpoint(zero_offset), name="model.layers.0.mlp.up_proj")
    assert lin.use_cpu_kernel()
    return lin


def _bound(layer) -> torch.Tensor:
    """[K, N]: the largest |W_cpu - W| that rounding S and Z of every part to bf16 can cause."""
    g = layer.g_idx.long()
    s = layer.scales.float()[g]  # [K, N]
    q, z = layer.codes, layer.zeros[g]
    if layer.bits == 8:
        parts = [(16 * s, q >> 4, z >> 4), (s, q & 15, z & 15)]
    else:
        shift = 8 - 2 ** (layer.bits - 1) if layer.bits < 4 else 0
        parts = [(s, q + shift, z + shift)]
    return sum(2.0**-8 * (m * (c - 8).abs() + (m * (8 - zz)).abs()) for m, c, zz in parts)


@pytest.mark.parametrize("zero_offset", [1, 0], ids=["v1", "v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous", "act-order"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_repacked_weight_equals_checkpoint_weight_up_to_bf16_scales(bits, group_size, act_order, zero_offset):
    layer = make_layer(bits, K, N, group_size, act_order=act_order, seed=bits * 7 + group_size)
    lin = _load(layer, zero_offset)
    exact = layer.weight()  # [K, N] fp32, the checkpoint's dequantized weight
    got = lin.dequantized_weight().t()  # [K, N]: what the kernel computes with, in the file's input order
    err = (got - exact).abs()
    assert bool((err <= _bound(layer)).all()), float((err - _bound(layer)).max())
    assert float(err.max()) > 0  # the bf16 scales are visible: this checks the bound, not equality


@pytest.mark.parametrize("sym", [True, False])
def test_four_bit_codes_are_unchanged_and_scales_rounded_once(sym):
    layer = make_layer(4, K, N, 64, act_order=True, seed=3)
    if sym:
        layer.zeros.fill_(8)
    lin = _load(layer)
    order = lin.perm.long()
    assert torch.equal(cpu.unpack_codes(lin.cpu_weight[0], K), layer.codes[order])
    s = layer.scales.float()  # [G, N]; kernel group 64 = the checkpoint group
    assert torch.equal(lin.cpu_scale_zeros[0, ..., 0], s.to(torch.bfloat16))
    assert torch.equal(lin.cpu_scale_zeros[0, ..., 1], (s * (8 - layer.zeros.float())).to(torch.bfloat16))
    if sym:
        assert not lin.cpu_scale_zeros[0, ..., 1].any()  # symmetric 4-bit: Z = 0 exactly


def test_eight_bit_extreme_zeros_0_and_255():
    # the 8-bit split into nibbles at its ends: z = 255 gives zh = zl = 15, z = 0 gives 0 and 0 (z = 0 only in
    # gptq_v2: v1 stores z - 1; a v1 file's z = 256 is refused by the validation, tests/kernels/test_qlinear.py)
    layer = make_layer(8, K, N, 128)
    layer.zeros[0, :5] = 255
    for zero_offset in (1, 0):
        lin = _load(layer, zero_offset)
        err = (lin.dequantized_weight().t() - layer.weight()).abs()
        assert bool((err <= _bound(layer)).all())
        layer.zeros[1, :5] = 0


@pytest.mark.parametrize("path", ["int4", "dense-tile"])
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_output_within_bf16_of_the_represented_weight_and_1pct_of_reference(bits, m, path):
    n = 192  # the dense tile path needs whole blocks of 64 columns
    layer = make_layer(bits, K, n, 64, act_order=True, seed=m + bits)
    lin = _load(layer)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m))
    xp = x.index_select(-1, lin.perm)
    out = cpu.matmul(xp, lin.cpu_weight, lin.cpu_scale_zeros, lin.cpu_group, lin.bias, path=path)
    represented = cpu.represented_weight(lin.cpu_weight, lin.cpu_scale_zeros, lin.cpu_group)  # kernel order
    want = xp.to(torch.bfloat16).float() @ represented + lin.bias.float()
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out, want, rtol=2 * eps, atol=2 * eps * float(want.abs().max()))
    exact = reference.matmul(x, layer.qweight(), layer.zeros, layer.scales, layer.g_idx, bits, layer.bias.float())
    assert float((out - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_uses_the_kernel_and_keeps_dtype_and_leading_dims(dtype):
    layer = make_layer(4, K, N, 128, act_order=True)
    lin = _load(layer)
    assert lin.qweight is None and lin.zeros is None and lin.scales is None  # no second copy of the weight
    x = torch.randn(2, 3, K).to(dtype)
    out = lin(x)
    assert out.shape == (2, 3, N) and out.dtype == dtype
    exact = reference.matmul(x.float(), layer.qweight(), layer.zeros, layer.scales, layer.g_idx, 4, layer.bias.float())
    assert float((out.float() - exact).norm() / exact.norm()) < 1e-2
    lin.backend = "torch"  # an fp32 matmul on the same represented weight
    torch.testing.assert_close(lin(x.float()), x.float() @ lin.dequantized_weight().t() + lin.bias.float())
    with pytest.raises(ValueError, match="repacked for the CPU int4 kernel"):
        lin.backend = "triton"


def test_dense_tile_path_is_chosen_from_the_measured_crossover():
    assert cpu.path_for(cpu.DENSE_MIN_ROWS - 1, 4096) == "int4"
    assert cpu.path_for(cpu.DENSE_MIN_ROWS, 4096) == "dense-tile"
    assert cpu.path_for(cpu.DENSE_MIN_ROWS, 4096 + 32) == "int4"  # no whole 64-column blocks


@pytest.mark.parametrize("bits, max_ratio", [(2, 0.28), (3, 0.28), (4, 0.28), (8, 0.54)])
def test_repacked_layer_stays_packed(bits, max_ratio):
    k, n, gs = 1024, 512, 128
    lin = _load(make_layer(bits, k, n, gs, act_order=True))
    parts = 2 if bits == 8 else 1
    # nibbles + bf16 (S, Z) per 128 rows + fp16 bias + int32 permutation
    assert lin.packed_nbytes() == parts * (k * n // 2 + k // gs * n * 4) + n * 2 + k * 4
    assert lin.packed_nbytes() / (k * n * 2) < max_ratio  # against the bf16 weight


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"group_size": 48}, "group_size 48 with in_features 192 has no common divisor"),
        ({"g_idx": "unequal"}, "groups are of unequal size"),
    ],
)
def test_fallback_logs_the_reason_once_and_stays_correct(caplog, change, reason):
    k = 192
    layer = make_layer(4, k, N, change.get("group_size", 64))
    if "g_idx" in change:
        layer.g_idx = torch.tensor([0] * 100 + [1] * 28 + [2] * 64, dtype=torch.int32)[torch.randperm(k)]
    lin = QuantLinear.from_checkpoint(**layer.checkpoint(1))
    qlinear._note_cpu_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gptqlab.qlinear"):
        assert not lin.use_cpu_kernel() and not lin.use_cpu_kernel()
    assert caplog.text.count(reason) == 1, caplog.text
    x = torch.randn(3, k)
    want = reference.matmul(x, layer.qweight(), layer.zeros, layer.scales, layer.g_idx, 4, layer.bias.float())
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


def test_module_cast_keeps_the_kernel_working():
    layer = make_layer(4, K, N, 128)
    lin = _load(layer)
    x = torch.randn(3, K)
    want = lin(x)
    lin.half()  # casts the floating buffers (scale_zeros to fp16, bias); the kernel still gets bf16
    assert lin.cpu_scale_zeros.dtype == torch.float16
    got = lin(x.half())
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
