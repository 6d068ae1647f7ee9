"""QuantLinear: the module that replaces ``nn.Linear`` in a loaded GPTQ model. Its weight stays packed."""

from __future__ import annotations

import functools
import logging

import torch

from gptqlab.checkpoint.validate import LinearRules, check_linear
from gptqlab.kernels import BACKENDS, cpu, gptq_matmul, reference
from gptqlab.kernels.layout import check_operands
from gptqlab.quant.pack import pack_rows, unpack_cols, unpack_rows

logger = logging.getLogger(__name__)


@functools.cache
def _note_cpu_fallback(reason: str) -> None:
    """Say once per process and reason that a CPU layer runs the slow reference."""
    logger.warning(
        "gptqlab: %s; these layers run the torch reference on the CPU (correct, but it dequantizes the "
        "whole layer on every call)",
        reason,
    )


class QuantLinear(torch.nn.Module):
    """A GPTQ-quantized Linear: ``y = x @ W + bias`` with W kept packed (about bits/16 of the fp16 bytes).

    Build it with :meth:`from_checkpoint` from the tensors of a file (docs/FORMAT.md). Buffers, in the layout
    of :mod:`gptqlab.kernels.layout` (K = in_features, N = out_features, G = groups):

    - ``qweight`` [K*bits/32, N] int32: codes packed along K; rows are in kernel order (see ``perm``).
    - ``zeros`` [G, N] uint8: actual zero points, the v1 offset already added.
    - ``scales`` [G, N] as stored (fp16). ``bias`` [N] or None (an all-zero bias is dropped).
    - ``perm`` [K] int32 or None: act-order. Input channels are reordered once at load time so that
      groups are contiguous (row i of ``qweight`` is original input ``perm[i]``), and forward reads
      ``x[..., perm]``. The fast kernels then never see g_idx.
    - ``g_idx`` [K] int32 or None: only for a group assignment that no reordering makes contiguous
      (groups of unequal size; GPTQ never writes these). Such a layer runs the torch reference with
      g_idx on every call: correct, but it dequantizes the whole layer each time.

    The buffers are not persistent: ``state_dict()`` holds none of them, because they are not the file
    tensors (zeros unpacked, rows permuted). Export from the checkpoint tensors or
    :meth:`dequantized_weight`. Casting the module to another float dtype casts ``scales`` and ``bias``
    as for any floating buffer; move a loaded model with ``.to(device)`` only.

    ``forward`` keeps x's dtype (fp16, bf16 or fp32). ``backend`` picks the implementation and may be
    changed at any time: "auto" (Triton kernels on CUDA, else the torch reference, which dequantizes
    only this layer and only for this call), "triton" or "torch"; see ``gptqlab.kernels.backend_for``.

    On the CPU, :meth:`use_cpu_kernel` (called by ``gptqlab.load(device="cpu")``) repacks the layer once
    for torch's int4 kernel (:mod:`gptqlab.kernels.cpu`) and drops ``qweight``, ``zeros`` and ``scales``;
    the layer then holds ``cpu_weight`` [P, N, K/2] uint8 and ``cpu_scale_zeros`` [P, K/gk, N, 2] bf16
    (P = 2 for 8-bit, else 1), keeps ``perm`` and ``bias``, and computes with bf16 scales (tolerance in
    that module's docstring). backend "auto" runs the kernel; "torch" runs an fp32 matmul on the weight the
    kernel represents (the reference for that layer); "triton" is refused.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int,
        perm: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> None:
        """Wrap tensors already in the internal layout (see the class docstring); most callers want
        :meth:`from_checkpoint`. Raises ValueError on inconsistent shapes."""
        super().__init__()
        self.in_features = qweight.shape[0] * 32 // bits
        self.out_features = qweight.shape[1]
        probe = torch.empty(0, self.in_features, dtype=torch.float16, device=qweight.device)
        check_operands(probe, qweight, zeros, scales, bits, group_size, bias)
        for name, index in (("perm", perm), ("g_idx", g_idx)):
            if index is not None and index.shape != (self.in_features,):
                raise ValueError(f"{name} must have shape [K] = [{self.in_features}], got {tuple(index.shape)}")
        if perm is not None and g_idx is not None:
            raise ValueError("give perm (groups made contiguous) or g_idx (general groups), not both")
        self.bits = bits
        self.group_size = group_size
        self.backend = backend
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("zeros", zeros, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("g_idx", g_idx, persistent=False)
        self.cpu_group: int | None = None  # kernel group size gk once repacked for the CPU kernel

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        if value == "triton" and getattr(self, "cpu_group", None) is not None:
            raise ValueError("this layer was repacked for the CPU int4 kernel; backend 'triton' needs the GPTQ layout")
        self._backend = value

    def cpu_kernel_reason(self) -> str | None:
        """Why this layer cannot run the CPU int4 kernel, or None if it can (or already does)."""
        if self.cpu_group is not None:
            return None
        if self.qweight.device.type != "cpu":
            return f"the layer is on {self.qweight.device}, not the CPU"
        if self.g_idx is not None:
            return "its groups are of unequal size (a g_idx that no reordering makes contiguous)"
        return cpu.unsupported_reason(self.in_features, self.out_features, self.bits, self.group_size)

    def use_cpu_kernel(self) -> bool:
        """Repack once for the CPU int4 kernel, replacing the GPTQ buffers; True if the layer now uses it.

        When the layer cannot, the reason is logged once per process (logger ``gptqlab.qlinear``, level
        WARNING) and the layer keeps its GPTQ layout and the torch reference.
        """
        reason = self.cpu_kernel_reason()
        if reason is not None:
            _note_cpu_fallback(reason)
            return False
        if self.cpu_group is not None:
            return True
        codes = unpack_rows(self.qweight, self.bits)  # [K, N], kernel row order
        weight, scale_zeros, group = cpu.repack(codes, self.zeros, self.scales, self.bits, self.group_size)
        self.register_buffer("cpu_weight", weight, persistent=False)
        self.register_buffer("cpu_scale_zeros", scale_zeros, persistent=False)
        for name in ("qweight", "zeros", "scales"):
            delattr(self, name)
            self.register_buffer(name, None, persistent=False)
        self.cpu_group = group
        return True

    @classmethod
    def from_checkpoint(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        in_features: int,
        out_features: int,
        zero_offset: int,
        name: str = "",
    ) -> QuantLinear:
        """Build the layer from the tensors of one Linear exactly as stored in the file (docs/FORMAT.md).

        qweight: [K*bits/32, N] int32. qzeros: [G, N*bits/32] int32, packed. scales: [G, N] float.
        g_idx: [K] integer, or None for contiguous groups. bias: [N] or None.
        group_size: -1 means one group of K rows. zero_offset: 1 for checkpoint_format "gptq" (v1, the
        file stores z - 1), 0 for "gptq_v2". name: the module's prefix, used in error messages.
        Raises CheckpointError naming the tensor that breaks a rule of the format: the one validation,
        :func:`gptqlab.checkpoint.validate.check_linear` (shapes, dtypes, finite positive scales, zero
        points in [0, 2^bits), g_idx in range, finite bias).
        """
        k, n = in_features, out_features
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx, "bias": bias}
        check_linear(tensors, LinearRules(bits, group_size, zero_offset), k, n, name=name)
        if bias is not None and not bool(bias.any()):
            bias = None  # AutoGPTQ writes zeros for Linears without a bias
        contiguous = reference.contiguous_g_idx(k, group_size, qweight.device)
        if g_idx is None:
            g_idx = contiguous
        g_idx = g_idx.to(device=qweight.device, dtype=torch.int32)
        zeros = (unpack_cols(qzeros, bits) + zero_offset).to(torch.uint8)  # [G, N]; check_linear: z < 2^bits
        layer = {"bits": bits, "group_size": group_size}
        if torch.equal(g_idx, contiguous):
            return cls(qweight, zeros, scales, bias, **layer)
        order = torch.argsort(g_idx, stable=True)  # [K]: kernel row i <- original input order[i]
        if torch.equal(g_idx[order], contiguous):
            repacked = pack_rows(unpack_rows(qweight, bits)[order], bits)
            return cls(repacked, zeros, scales, bias, perm=order.to(torch.int32), **layer)
        return cls(qweight, zeros, scales, bias, g_idx=g_idx, **layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] fp16/bf16/fp32 → [..., out_features] in x.dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features in its last dim, got {tuple(x.shape)}")
        if self.cpu_group is not None:
            if self.perm is not None:
                x = x.index_select(-1, self.perm)
            if x.device.type == "cpu" and self.backend == "auto":
                return cpu.matmul(x, self.cpu_weight, self.cpu_scale_zeros, self.cpu_group, self.bias)
            w = cpu.represented_weight(self.cpu_weight.cpu(), self.cpu_scale_zeros.cpu(), self.cpu_group)  # [K, N]
            out = x.to(torch.float32) @ w.to(x.device)
            if self.bias is not None:
                out += self.bias.to(torch.float32)
            return out.to(x.dtype)
        if self.g_idx is not None:
            return reference.matmul(x, self.qweight, self.zeros, self.scales, self.g_idx, self.bits, self.bias)
        return gptq_matmul(
            x,
            self.qweight,
            self.zeros,
            self.scales,
            self.bits,
            self.group_size,
            self.bias,
            backend=self.backend,
            perm=self.perm,  # the Triton kernels gather x in their loads; the torch path does index_select
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a torch Linear stores it: [out_features, in_features] in the original input order,
        in ``dtype`` (default: the scales' dtype, float32 for a layer repacked for the CPU kernel, whose
        weight is then the one that kernel represents)."""
        if self.cpu_group is not None:
            w = cpu.represented_weight(self.cpu_weight.cpu(), self.cpu_scale_zeros.cpu(), self.cpu_group)
            w = w.to(device=self.cpu_weight.device, dtype=dtype or torch.float32)
            if self.perm is not None:
                w = torch.empty_like(w).index_copy_(0, self.perm.long(), w)
            return w.t().contiguous()
        g_idx = self.g_idx
        if g_idx is None:
            g_idx = reference.contiguous_g_idx(self.in_features, self.group_size, self.qweight.device)
        w = reference.dequantize(self.qweight, self.zeros, self.scales, g_idx, self.bits, dtype)  # [K, N]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm.long(), w)
        return w.t().contiguous()

    def packed_nbytes(self) -> int:
        """Bytes held by this layer's buffers (packed weight, zeros, scales, bias, permutation)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        groups = "act-order" if self.perm is not None else "g_idx" if self.g_idx is not None else "contiguous"
        kernel = f", cpu_int4_group={self.cpu_group}" if self.cpu_group is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, groups={groups}, backend={self.backend}"
            f"{kernel}"
        )
