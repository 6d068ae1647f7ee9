"""QuantLinear: loading from checkpoint tensors, act-order reordering, memory, fallbacks, errors.

The "triton" backend runs in triton's CPU interpreter (TRITON_INTERPRET=1 is set below, before triton is
imported); ``TRITON_INTERPRET=0 pytest tests/kernels`` runs the same tests on a GPU with compiled kernels.
Tolerances as in test_triton_kernels.py: one rounding of the output dtype against the reference.
"""

import importlib.util
import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from synth_layers import assert_within_one_ulp, check_interpreter_mode, make_layer, patch_interpreter_bf16

from gptqlab import kernels
from gptqlab.errors import CheckpointError
from gptqlab.kernels import reference
from gptqlab.qlinear import QuantLinear

check_interpreter_mode()
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
K, N = 256, 160  # N: a multiple of 32 (3-bit qzeros), not of any kernel's N tile


@pytest.fixture(autouse=True)
def _bf16_like_gpu(monkeypatch):
    patch_interpreter_bf16(monkeypatch)


def _load(layer, file_offset=1, backend="auto", **changes):
    tensors = {**layer.checkpoint(file_offset), **changes}
    lin = QuantLinear.from_checkpoint(**tensors, name="model.layers.0.mlp.up_proj")
    lin.backend = backend
    return lin.to(DEVICE)


def _x(m, dtype=torch.float16, k=K):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)


def _reference(layer, x):
    """The layer's matmul from its file tensors, unreordered, with its own g_idx."""
    return reference.matmul(
        x,
        layer.qweight().to(x.device),
        layer.zeros.to(x.device),
        layer.scales.to(x.device),
        layer.g_idx.to(x.device),
        layer.bits,
        layer.bias.to(x.device),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_and_v2_zero_offsets_give_identical_outputs(bits, backend):
    layer = make_layer(bits, K, N, 64, seed=bits)
    v1, v2 = _load(layer, 1, backend), _load(layer, 0, backend)
    assert torch.equal(v1.zeros.cpu(), layer.zeros.to(torch.uint8)) and torch.equal(v1.zeros, v2.zeros)
    for m in (1, 33):
        x = _x(m)
        out = v1(x)
        assert torch.equal(out, v2(x))
        assert_within_one_ulp(out, _reference(layer, x))


@needs_triton
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_order_reordering_matches_unreordered_reference(bits, group_size, m):
    layer = make_layer(bits, K, N, group_size, act_order=True, seed=bits)
    lin = _load(layer, backend="triton")
    assert lin.perm is not None and lin.g_idx is None
    x = _x(m)
    assert_within_one_ulp(lin(x), _reference(layer, x))
    assert torch.equal(lin.dequantized_weight(torch.float32).cpu(), layer.weight().t())


@needs_triton
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("act_order", [False, True])
def test_bfloat16_activations(act_order, m):
    layer = make_layer(4, K, N, 128, act_order=act_order)
    lin = _load(layer, backend="triton")
    x = _x(m, torch.bfloat16)
    out = lin(x)
    assert out.dtype == torch.bfloat16
    assert_within_one_ulp(out, _reference(layer, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unequal_groups_keep_the_general_g_idx_path(backend):
    layer = make_layer(4, K, N, 64)
    # groups of 100, 28, 64 and 64 rows, shuffled: no permutation makes them k // 64
    layer.g_idx = torch.tensor([0] * 100 + [1] * 28 + [2] * 64 + [3] * 64, dtype=torch.int32)[torch.randperm(K)]
    lin = _load(layer, backend=backend)
    assert lin.perm is None and lin.g_idx is not None
    x = _x(3)
    assert torch.equal(lin(x), _reference(layer, x))
    assert torch.equal(lin.dequantized_weight(torch.float32).cpu(), layer.weight().t())


@pytest.mark.parametrize("bits, max_ratio", [(2, 0.145), (3, 0.21), (4, 0.27), (8, 0.52)])
def test_weights_stay_packed(bits, max_ratio):
    k, n, gs = 1024, 512, 128
    lin = _load(make_layer(bits, k, n, gs, act_order=True))
    g = k // gs
    # packed codes + uint8 zeros + fp16 scales + fp16 bias + int32 permutation
    expected = k * n * bits // 8 + g * n * (1 + 2) + n * 2 + k * 4
    assert lin.packed_nbytes() == expected
    assert lin.packed_nbytes() / (k * n * 2) < max_ratio  # against the fp16 weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_bit_falls_back_to_the_reference(caplog, backend):
    layer = make_layer(3, K, N, 128, act_order=True)
    lin = _load(layer, backend=backend)
    kernels._note_fallback.cache_clear()  # each reason is logged once per process
    x = _x(5)
    with caplog.at_level(logging.INFO, logger="gptqlab.kernels"):
        out = lin(x)
    assert_within_one_ulp(out, _reference(layer, x))  # reordered inputs: another summation order
    if backend == "triton":
        assert "no Triton kernel for 3-bit weights" in caplog.text


def test_v1_eight_bit_zero_of_256_is_rejected():
    # a v1 file can store 0xFF for an 8-bit zero; readers add 1, giving 256, which no 8-bit code range holds
    layer = make_layer(8, K, N, 128)
    layer.zeros[0, :5] = 256
    with pytest.raises(CheckpointError, match=r"up_proj\.qzeros: 5 of 320 zero points decode to 256"):
        _load(layer, 1)
    layer.zeros[0, :5] = 255  # the largest zero point is kept, in uint8
    lin = _load(layer, 1)
    assert lin.zeros.dtype == torch.uint8 and int(lin.zeros.max()) == 255
    assert torch.equal(lin.dequantized_weight(torch.float32).cpu(), layer.weight().t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_keeps_dtype_and_leading_dims(dtype):
    lin = _load(make_layer(4, K, N, 128), backend="torch")
    x = torch.randn(2, 3, K).to(dtype).to(DEVICE)
    out = lin(x)
    assert out.shape == (2, 3, N) and out.dtype == dtype


def test_all_zero_bias_is_dropped():
    layer = make_layer(4, K, N, 128)
    assert _load(layer, bias=torch.zeros(N, dtype=torch.float16)).bias is None
    assert _load(layer, bias=None).bias is None


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"qweight": torch.zeros(31, N, dtype=torch.int32)},
            r"up_proj\.qweight: shape \[31, 160\], expected \[32, 160\]",
        ),
        ({"qweight": torch.zeros(32, N, dtype=torch.int64)}, r"qweight: dtype torch.int64, expected int32"),
        ({"qzeros": torch.zeros(4, 20, dtype=torch.int32)}, r"qzeros: shape \[4, 20\], expected \[2, 20\]"),
        ({"scales": torch.zeros(2, 80, dtype=torch.float16)}, r"scales: shape \[2, 80\], expected \[2, 160\]"),
        ({"scales": torch.zeros(2, N, dtype=torch.int32)}, r"scales: dtype torch.int32, expected a float dtype"),
        ({"scales": torch.zeros(2, N, dtype=torch.float16)}, r"scales: 320 of 320 scales are not finite and positive"),
        ({"g_idx": torch.full((K,), 2, dtype=torch.int32)}, r"g_idx: group indices must lie in \[0, 2\)"),
        ({"g_idx": torch.zeros(K - 1, dtype=torch.int32)}, r"g_idx: shape \[255\], expected \[256\]"),
        ({"bias": torch.ones(N + 1, dtype=torch.float16)}, r"bias: shape \[161\], expected \[160\]"),
        ({"bias": torch.full((N,), float("nan"), dtype=torch.float16)}, r"bias: contains NaN or Inf"),
        ({"in_features": 100}, r"qweight: 4-bit packing needs in_features \(100\) .* divisible by 8"),
        ({"zero_offset": 2}, r"config: zero_offset must be 1 .* or 0"),
        ({"bits": 5}, r"config: bits must be one of 2, 3, 4, 8, got 5"),
    ],
)
def test_bad_checkpoint_tensors_raise_checkpoint_error(changes, message):
    layer = make_layer(4, K, N, 128)
    with pytest.raises(CheckpointError, match=message):
        _load(layer, **changes)


def test_bad_input_and_backend_raise_value_error():
    lin = _load(make_layer(4, K, N, 128))
    with pytest.raises(ValueError, match="expected input with 256 features"):
        lin(_x(2, k=K + 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        lin.backend = "cuda"
