"""The settings of ``gptqlab quantize``: one validated record.

Each field carries its command-line help in its metadata (:func:`option`); ``gptqlab quantize`` builds
its flags from these fields (:mod:`gptqlab.cli.quantize`), so a setting is added here and nowhere else.
The module imports no torch, so the CLI starts fast; :class:`QuantConfig` is built on validation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gptqlab.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)

METHODS = ("gptq", "rtn")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("gptq", "gptq_v2")
DTYPES = ("float16", "bfloat16")
CPU_COMPUTE = ("auto", "bfloat16", "float32")
# Calibration defaults (nsamples, seqlen) by model size: small models quantize in seconds with 32 x 512
# (tiny-zh-llama: 21.8 s on the 2-core CPU VM, against 95.7 s at 128 x 1024); larger ones get GPTQ's usual 128 x 2048.
SMALL_MODEL_PARAMS = 100_000_000
SMALL_MODEL_CALIBRATION = (32, 512)
LARGE_MODEL_CALIBRATION = (128, 2048)
# Seconds a torchrun rank waits for another before the run stops (the owner of a large Linear may be solving it).
DEFAULT_DIST_TIMEOUT = 1800.0


def parse_size(text: str) -> int:
    """'2GB' → 2·10⁹ bytes; accepts B, KB, MB, GB, TB (powers of 1000) or a plain byte count."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"cannot read size {text!r}; use a number with an optional KB/MB/GB unit, e.g. 2GB")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


def calibration_size(opts: QuantizeOptions, params: int, context: int | None) -> tuple[int, int]:
    """(nsamples, seqlen) for a model of ``params`` parameters and ``context`` tokens (None: unlimited): the
    options' values where given, else the size-dependent defaults above, the seqlen capped at the context.
    Raises ConfigError when a given --seqlen exceeds the context."""
    nsamples, seqlen = SMALL_MODEL_CALIBRATION if params < SMALL_MODEL_PARAMS else LARGE_MODEL_CALIBRATION
    if opts.seqlen is not None:
        if context is not None and opts.seqlen > context:
            raise ConfigError(f"--seqlen {opts.seqlen} is longer than the model's context of {context} tokens")
        seqlen = opts.seqlen
    elif context is not None:
        seqlen = min(seqlen, context)
    return opts.nsamples or nsamples, seqlen


def argument(help: str):
    """A required positional field."""
    return field(metadata={"help": help, "argument": True})


def option(default, help: str, *decls: str, choices: tuple[str, ...] = (), cli_name: str = "", invert: bool = False):
    """A field with a default and its flag.

    help: the ``--help`` text (typer adds ``[default: ...]``; say the default in the text when it is None).
    decls: the flag spellings when typer's own (``--group-size``, ``--mse/--no-mse``) are not wanted.
    choices: the allowed strings, shown as ``<a|b>``. cli_name/invert: the CLI parameter is called
    ``cli_name`` and holds ``not value`` (``--quiet`` sets ``progress=False``).
    """
    meta = {"help": help, "decls": decls, "choices": choices, "cli_name": cli_name, "invert": invert}
    return field(default=default, metadata=meta)


@dataclass
class QuantizeOptions:
    """Everything ``gptqlab quantize`` takes; CLI flags map one to one onto these fields."""

    model: str = argument("Embedded model name (tiny-zh-llama, tiny-zh-bloom), local folder or Hub id.")
    out: str = argument("Output folder for the packed GPTQ checkpoint; must not exist yet.")
    bits: int = option(4, "Code width in bits: 2, 3, 4 or 8.")
    group_size: int = option(128, "Input channels sharing one scale/zero; -1 = one group per row.")
    act_order: bool = option(
        False, "Quantize columns by decreasing Hessian diagonal (desc_act).", "--act-order/--no-act-order"
    )
    static_groups: bool = option(
        False, "With --act-order, fix group scales before GPTQ so g_idx stays k // group_size."
    )
    sym: bool = option(True, "Symmetric codes (zero = 2^(bits-1)) or asymmetric min/max.", "--sym/--no-sym")
    method: str = option("gptq", "gptq: error-compensating GPTQ; rtn: round-to-nearest baseline.", choices=METHODS)
    calib: str = option(
        "peoples-daily",
        "Calibration spec: comma-separated NAME[:ARG][:WEIGHT] items, e.g. "
        "'peoples-daily:0.7,belle:data.jsonl:0.3'. Names: peoples-daily, reviews, belle:PATH, txt:PATH, hf:NAME. "
        "Files are read as a stream: a .txt line over 16,384 characters becomes several paragraphs, a .jsonl "
        "record may hold at most 4,000,000 characters, a .json list is decoded whole (use .jsonl for big files).",
    )
    nsamples: int | None = option(
        None, "Number of calibration sequences. Default: 32 for models under 100 M parameters, else 128."
    )
    seqlen: int | None = option(
        None,
        "Tokens per calibration sequence. Default: min(2048, the model's context); for models under 100 M "
        "parameters min(512, the model's context).",
    )
    device: str = option("auto", "Where blocks are quantized: auto picks cuda when available.", choices=DEVICES)
    seed: int = option(0, "Seed for calibration sampling.")
    format: str = option("gptq", "gptq (v1, stores zero-1, vLLM's default) or gptq_v2.", "--format", choices=FORMATS)
    damp_percent: float = option(
        0.01, "Dampening of the Hessian diagonal, in (0, 1); raised automatically if Cholesky fails."
    )
    true_sequential: bool = option(
        True,
        "Quantize a block's Linears stage by stage, each seeing the quantized stages before it.",
        "--true-sequential/--no-true-sequential",
    )
    mse: bool = option(
        False, "Search a clipping range per group that minimises the quantization error.", "--mse/--no-mse"
    )
    dtype: str | None = option(
        None,
        "Float type of the written unquantized tensors (config.json dtype) and of calibration on CUDA. "
        "Default: the model's own (float16 for a float32 model). Scales stay float16, as the format requires.",
        choices=DTYPES,
    )
    max_shard_size: str = option("4GB", "Largest safetensors shard, e.g. 2GB or 500MB.")
    overwrite: bool = option(
        False,
        "Replace OUT if it exists: the old one is moved aside and deleted only once the new checkpoint is "
        "complete and verified. Refused when OUT is, contains or lies inside the model folder or a calibration "
        "file. Default: off.",
        "--overwrite",
    )
    trust_remote_code: bool = option(
        False, "Allow a model's own Python code to run (custom architectures). Default: off.", "--trust-remote-code"
    )
    progress: bool = option(
        True,
        "No progress bars or summary. Default: off (progress is shown).",
        "--quiet",
        "-q",
        cli_name="quiet",
        invert=True,
    )
    resume: bool | None = option(
        None,
        "OUT.partial keeps the progress of a killed run, and rerunning the same command continues it. "
        "Default: continue when one matches. --resume: fail if there is none; --no-resume: delete it, start over.",
        "--resume/--no-resume",
    )
    """None: continue a matching OUT.partial if there is one; True: the same, but fail when there is none;
    False: delete any OUT.partial and start over."""
    batch_size: int | None = option(
        None,
        "Calibration samples per forward batch. Consecutive batches (at most 16 groups) are also the units "
        "that torchrun ranks share and that the Hessian sums in a fixed order, so the checkpoint's bits depend "
        "on it. Default: as many as fit 512 MiB of activations, from the model's shape and --seqlen only.",
    )
    dist_timeout: float = option(
        DEFAULT_DIST_TIMEOUT,
        "Under torchrun: seconds a rank waits for another (e.g. while the owner of a large Linear solves it) "
        "before the run stops with a line naming that rank.",
    )
    cpu_compute: str = option(
        "auto",
        "Precision of the matrix products in the calibration forward passes on the CPU. auto: bfloat16 where "
        "the CPU has bfloat16 matrix instructions (AMX, AVX512-BF16), else float32. The weights, Hessians and "
        "GPTQ solve stay float32 either way.",
        choices=CPU_COMPUTE,
    )
    quant: object = field(init=False, repr=False)
    """The :class:`gptqlab.quant.QuantConfig` these options give (built by validation)."""

    def __post_init__(self) -> None:
        from gptqlab.quant import QuantConfig

        if self.method not in METHODS:
            raise ConfigError(f"method must be gptq or rtn, got {self.method!r}")
        if self.nsamples is not None and self.nsamples <= 0:
            raise ConfigError(f"--nsamples must be positive, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen <= 0:
            raise ConfigError(f"--seqlen must be positive, got {self.seqlen}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout:g}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be float16 or bfloat16, got {self.dtype!r}")
        if self.cpu_compute not in CPU_COMPUTE:
            raise ConfigError(f"--cpu-compute must be auto, bfloat16 or float32, got {self.cpu_compute!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
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

    def checkpoint_dtype(self, config) -> str:
        """The float type the run writes and calibrates in on CUDA: ``dtype`` when given, else the model
        config's own (``dtype``, or ``torch_dtype`` in older configs) when it is bfloat16, else float16."""
        if self.dtype is not None:
            return self.dtype
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return "bfloat16" if str(own).removeprefix("torch.") == "bfloat16" else "float16"
