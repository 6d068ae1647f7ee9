"""The torch reference and the dispatcher's backend choice; no triton needed."""

import logging

import pytest
import torch
from synth_layers import make_layer

from gptqlab import kernels
from gptqlab.kernels import backend_for, gptq_matmul, kernel_for, reference


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_is_exact(bits, act_order):
    layer = make_layer(bits, 256, 96, 64, act_order=act_order, seed=bits)
    w = reference.dequantize(layer.qweight(), layer.zeros, layer.scales, layer.g_idx, bits, torch.float32)
    assert torch.equal(w, layer.weight())
    w16 = reference.dequantize(layer.qweight(), layer.zeros, layer.scales, layer.g_idx, bits)
    assert w16.dtype == torch.float16 and torch.equal(w16, layer.weight().half())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matmul_is_close_to_float64(dtype):
    layer = make_layer(4, 256, 96, 128, act_order=True)
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = reference.matmul(x, layer.qweight(), layer.zeros, layer.scales, layer.g_idx, 4, layer.bias)
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    exact = x.double() @ layer.weight().double() + layer.bias.double()
    # W rounded to dtype (relative eps/2 each) and the output rounded once: a few eps of the output scale
    eps = torch.finfo(dtype).eps
    assert (out.double() - exact).abs().max() <= 4 * eps * exact.abs().max()


def test_contiguous_g_idx():
    assert reference.contiguous_g_idx(6, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert reference.contiguous_g_idx(6, -1).tolist() == [0] * 6


def test_reference_rejects_mismatched_g_idx():
    layer = make_layer(4, 64, 32, 32)
    with pytest.raises(ValueError, match=r"g_idx must have shape \[K\] = \[64\]"):
        reference.dequantize(layer.qweight(), layer.zeros, layer.scales, layer.g_idx[:32], 4)


def test_backend_choice():
    assert backend_for(4, "cpu") == "torch"
    assert backend_for(4, "cpu", "torch") == "torch"
    assert kernel_for(1) == "gemv" and kernel_for(16) == "gemv" and kernel_for(17) == "gemm"
    with pytest.raises(ValueError, match="backend must be one of"):
        backend_for(4, "cpu", "cuda")


def test_three_bit_falls_back_to_torch_and_says_so(caplog):
    kernels._note_fallback.cache_clear()  # each reason is logged once per process
    with caplog.at_level(logging.INFO, logger="gptqlab.kernels"):
        assert backend_for(3, "cuda", "triton") == "torch"
        assert backend_for(3, "cuda") == "torch"
    assert "no Triton kernel for 3-bit weights" in caplog.text


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs"):
        backend_for(4, "cpu", "triton")


def test_auto_on_cpu_uses_reference():
    layer = make_layer(8, 128, 64, 32)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = gptq_matmul(x, layer.qweight(), layer.zeros, layer.scales, 8, 32, layer.bias)
    ref = reference.matmul(x, layer.qweight(), layer.zeros, layer.scales, layer.g_idx, 8, layer.bias)
    assert torch.equal(out, ref)
