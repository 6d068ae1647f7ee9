"""Helpers for the kernel tests: synthetic GPTQ layers with a known weight, a tolerance check, and a
patch that makes triton's CPU interpreter handle bfloat16 the way the GPU does.

A plain module rather than a conftest.py: other tests do ``from conftest import ...``, and a second
rootless conftest module would shadow theirs in ``sys.modules``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

from gptqlab.kernels.layout import num_groups, resolve_group_size
from gptqlab.quant.pack import pack_cols, pack_rows


@dataclass
class SynthLayer:
    """A random GPTQ layer described by its codes; every other form is derived from them.

    codes [K, N] int32, zeros [G, N] int32 (actual zero points), scales [G, N] fp16, g_idx [K] int32
    (shuffled for act-order), bias [N] fp16 or None.
    """

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def qweight(self) -> torch.Tensor:
        """[K*bits/32, N] int32 in the file's input order."""
        return pack_rows(self.codes, self.bits)

    def weight(self) -> torch.Tensor:
        """W [K, N] fp32 straight from the definition: scales[g] * (q - z[g]), exact in fp32."""
        g = self.g_idx.long()
        return self.scales.float()[g] * (self.codes - self.zeros[g]).float()

    def checkpoint(self, zero_offset: int) -> dict:
        """The tensors of a file (FORMAT.md) and the from_checkpoint keywords for this layer."""
        return {
            "qweight": self.qweight(),
            "qzeros": pack_cols(self.zeros - zero_offset, self.bits),
            "scales": self.scales,
            "g_idx": self.g_idx,
            "bias": self.bias,
            "bits": self.bits,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "zero_offset": zero_offset,
        }


def make_layer(
    bits: int,
    in_features: int,
    out_features: int,
    group_size: int,
    *,
    act_order: bool = False,
    bias: bool = True,
    seed: int = 0,
) -> SynthLayer:
    """Codes and zero points uniform over their range (zeros in [1, 2**bits) so v1 can store them),
    scales in [0.002, 0.02), and for act-order a g_idx that is a random permutation of k // group_size."""
    gen = torch.Generator().manual_seed(seed)
    k, n = in_features, out_features
    g = num_groups(k, group_size)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2**bits, (g, n), generator=gen, dtype=torch.int32)
    scales = (0.002 + 0.018 * torch.rand(g, n, generator=gen)).to(torch.float16)
    g_idx = torch.arange(k, dtype=torch.int32) // resolve_group_size(group_size, k)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    b = (0.1 * torch.randn(n, generator=gen)).to(torch.float16) if bias else None
    return SynthLayer(codes, zeros, scales, g_idx, b, bits, group_size)


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel vs reference, to one rounding of x.dtype: rtol = eps, atol = eps * max|ref|.

    The gemm and the gemv tiles that span groups use the reference's W (rounded to x.dtype) and differ
    only in the order of the fp32 sum; one-group gemv tiles use the unrounded W, so they differ from the
    reference by its rounding of W (about eps/2 * sqrt(K) * |x||W| for random data, well inside atol)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    eps = torch.finfo(ref.dtype).eps
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=eps, atol=eps * scale)


def patch_interpreter_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TRITON_INTERPRET=1, patch two bfloat16 gaps of triton's interpreter (undone by monkeypatch).

    The interpreter stores bf16 as raw uint16, so its ``tl.dot`` multiplies bit patterns
    (triton-lang/triton#11584; bf16 is documented as unsupported there), and its fp32 -> bf16 cast
    truncates where the GPU rounds to nearest even. The kernels are real GPU code; this makes the CPU
    interpreter compute what the GPU computes. Nothing is patched for compiled kernels.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def bf16_to_f32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(widened, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, bf16_to_f32(a), bf16_to_f32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)


def check_interpreter_mode() -> None:
    """Fail early, with the fix, when triton was imported before TRITON_INTERPRET=1 was set.

    triton builds its own jit helpers (``tl.cdiv``) when it is first imported; imported without the
    variable, they are GPU functions, and every interpreted kernel then fails with "Cannot call
    @triton.jit'd outside of the scope of a kernel".
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import triton.language as tl

    if type(tl.cdiv).__name__ != "InterpretedFunction":
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set (by a test module collected earlier); "
            "export TRITON_INTERPRET=1, or run `pytest tests/kernels` on its own",
            pytrace=False,
        )
