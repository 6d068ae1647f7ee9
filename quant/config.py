"""Quantization settings, validated once when they are made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gptqlab.errors import ConfigError
from gptqlab.quant.pack import SUPPORTED_BITS

__all__ = ["CHECKPOINT_FORMATS", "SUPPORTED_BITS", "QuantConfig"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    bits: code width, one of 2, 3, 4, 8.
    group_size: input channels that share a scale and zero; -1 means one group per output row.
    desc_act: act-order — quantize columns in order of decreasing Hessian diagonal.
    static_groups: with desc_act, fix every group's scale and zero before GPTQ updates the weights, so
        that g_idx stays k // group_size and kernels need no reordering.
    sym: symmetric codes (zero point 2**(bits-1)); otherwise asymmetric min/max.
    damp_percent: dampening λ added to diag(H) as a fraction of its mean, in (0, 1) (transformers refuses
        a config with 1 or more). The solver raises it for one layer (×10 per try, up to 1.0) when the
        Cholesky factorization fails; that value goes to the report, the config keeps this one.
    true_sequential: quantize the Linears of a block in execution order, re-collecting inputs after each
        stage (used by the layer-wise driver, not by :func:`gptq`).
    mse: search a clipping range per group that minimises the |w - q|^2.4 error instead of using min/max.
    block_size: GPTQ's lazy-batch width B (columns updated together).
    checkpoint_format: "gptq" (v1, the file stores z - 1) or "gptq_v2" (stores z). In v1 an asymmetric
        zero of 0 cannot be stored, so the quantizer keeps zeros ≥ 1 there (``min_zero``).
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    mse: bool = False
    block_size: int = 128
    checkpoint_format: str = "gptq"
    min_zero: int = field(init=False)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"group size must be -1 (one group per row) or a positive integer, got {self.group_size}")
        if not 0.0 < self.damp_percent < 1.0:
            raise ConfigError(
                f"damp_percent must be in (0, 1), got {self.damp_percent} "
                "(transformers refuses a checkpoint with 1 or more)"
            )
        if self.block_size <= 0:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(f"checkpoint format must be 'gptq' or 'gptq_v2', got {self.checkpoint_format!r}")
        object.__setattr__(self, "min_zero", 1 if self.checkpoint_format == "gptq" and not self.sym else 0)

    @property
    def maxq(self) -> int:
        """Largest code, 2**bits - 1."""
        return 2**self.bits - 1

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a matrix with ``in_features`` columns; raises if it does not divide."""
        gs = in_features if self.group_size == -1 else self.group_size
        if in_features % gs:
            raise ConfigError(
                f"group size {gs} does not divide in_features={in_features}; use a divisor of {in_features} or -1"
            )
        return gs

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("min_zero")
        return d
