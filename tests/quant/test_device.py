"""The quantizers keep every tensor on the weights' device and read nothing back per column.

CPU-only CI has no second device, so :mod:`fake_device` pretends: W and H are tagged as device tensors,
and any operation that mixes them with a tensor made on the host fails. The GPTQ of gptqlab 0.x, which
made its codes and scales on the host, fails this test.
"""

from __future__ import annotations

import pytest
import torch
from fake_device import FAKE, FakeDevice, Tagged, WrongDevice, to_device
from test_algorithm import CONFIGS, correlated_problem

from gptqlab.quant import QuantConfig, gptq, rtn


def test_the_fake_device_catches_a_host_tensor():
    W = to_device(torch.randn(4, 8))
    with FakeDevice(), pytest.raises(WrongDevice, match="mul mixes"):
        W * torch.ones(4, 8)  # made on the host
    with FakeDevice():
        assert W.device == FAKE
        assert isinstance(W * torch.ones(4, 8, device=W.device), Tagged)
        assert isinstance(torch.zeros_like(W), Tagged)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"b{c.bits}g{c.group_size}da{int(c.desc_act)}")
def test_gptq_stays_on_the_device(cfg):
    W, H = correlated_problem(K=256, N=16)
    with FakeDevice():
        res = gptq(to_device(W), to_device(H), cfg)
    for t in (res.codes, res.scales, res.zeros, res.g_idx, res.Q):
        assert isinstance(t, Tagged)
    plain = gptq(W, H, cfg)  # the same numbers without the pretence
    assert torch.equal(res.codes.as_subclass(torch.Tensor), plain.codes)
    assert res.loss == plain.loss


def test_rtn_stays_on_the_device():
    W, H = correlated_problem(K=256, N=16)
    with FakeDevice():
        res = rtn(to_device(W), QuantConfig(bits=4, group_size=64), to_device(H))
    assert all(isinstance(t, Tagged) for t in (res.codes, res.scales, res.zeros, res.g_idx, res.Q))


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_synchronises_a_fixed_number_of_times(desc_act):
    """Reading back happens per Linear (finiteness checks, the Cholesky status, the loss), never per column."""
    counts = []
    for K in (128, 512):
        W, H = correlated_problem(K=K, N=8)
        with FakeDevice() as mode:
            gptq(to_device(W), to_device(H), QuantConfig(bits=4, group_size=64, desc_act=desc_act))
        counts.append(len(mode.syncs))
    assert counts[0] == counts[1] <= 4, counts


def test_driver_hessians_stay_on_the_device():
    from gptqlab.quantize.distributed import Distributed

    x = torch.randn(2, 16, 32)
    with FakeDevice() as mode:
        xd = to_device(x)
        acc = Distributed.single(xd.device).hessian(32, 2)
        acc.add(xd)
        acc.add(xd.half())  # layer inputs kept in half precision are widened on the device
        H = acc.reduce(0)
        assert isinstance(H, Tagged)
    assert mode.syncs == []
    flat = x.reshape(-1, 32)
    expected = 2 * (flat.T @ flat + flat.half().float().T @ flat.half().float()) / 64
    assert torch.allclose(H.as_subclass(torch.Tensor), expected, rtol=1e-5, atol=1e-5)
