"""The settings of ``gptqlab quantize``: one validated record that the CLI maps onto field by field."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gptqlab.errors import ConfigError
from gptqlab.quant import QuantConfig
from gptqlab.quantize.driver import METHODS

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' → 2·10⁹ bytes; accepts B, KB, MB, GB, TB (powers of 1000) or a plain byte count."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"cannot read size {text!r}; use a number with an optional KB/MB/GB unit, e.g. 2GB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


@dataclass
class QuantizeOptions:
    """Everything ``gptqlab quantize`` takes; CLI flags map one to one onto these fields."""

    model: str
    out: str
    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    sym: bool = True
    method: str = "gptq"
    calib: str = "peoples-daily"
    nsamples: int = 128
    seqlen: int | None = None
    device: str = "auto"
    seed: int = 0
    format: str = "gptq"
    damp_percent: float = 0.01
    true_sequential: bool = True
    mse: bool = False
    max_shard_size: str = "4GB"
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    resume: bool | None = None
    """None: continue a matching OUT.partial if there is one; True: the same, but fail when there is none;
    False: delete any OUT.partial and start over."""
    quant: QuantConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be gptq or rtn, got {self.method!r}")
        if self.nsamples <= 0:
            raise ConfigError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen <= 0:
            raise ConfigError(f"--seqlen must be positive, got {self.seqlen}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        parse_size(self.max_shard_size)
        self.quant = QuantConfig(
            bits=self.bits,
            group_size=self.group_size,
            desc_act=self.act_order,
            static_groups=self.static_groups,
            sym=self.sym,
            damp_percent=self.damp_percent,
            true_sequential=self.true_sequential,
            mse=self.mse,
            checkpoint_format=self.format,
        )
