"""The ``gptqlab`` command line.

Bad input raises :class:`gptqlab.errors.GptqlabError`; :func:`main` prints it as one line on stderr and
exits with code 2, without a traceback. Every option below maps one to one onto a field of
:class:`gptqlab.quantize.options.QuantizeOptions` (and so onto :class:`gptqlab.quant.QuantConfig`).
"""

from __future__ import annotations

import logging
import sys
from enum import Enum

import typer

from gptqlab.cli.bench import app as bench_app
from gptqlab.cli.eval import app as eval_app
from gptqlab.errors import GptqlabError, printable

app = typer.Typer(
    help="GPTQ quantization workbench for Chinese LLMs: quantize, evaluate, benchmark and verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """GPTQ quantization workbench for Chinese LLMs: quantize, evaluate, benchmark and verify."""


app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Format(str, Enum):
    gptq = "gptq"
    gptq_v2 = "gptq_v2"


@app.command()
def quantize(
    model: str = typer.Argument(
        ..., help="Embedded model name (tiny-zh-llama, tiny-zh-bloom), local folder or Hub id."
    ),
    out: str = typer.Argument(..., help="Output folder for the packed GPTQ checkpoint; must not exist yet."),
    bits: int = typer.Option(4, help="Code width: 2, 3, 4 or 8 bits."),
    group_size: int = typer.Option(128, help="Input channels sharing one scale/zero; -1 = one group per row."),
    act_order: bool = typer.Option(
        False, "--act-order/--no-act-order", help="Quantize columns by decreasing Hessian diagonal (desc_act)."
    ),
    static_groups: bool = typer.Option(
        False, help="With --act-order, fix group scales before GPTQ so g_idx stays k // group_size."
    ),
    sym: bool = typer.Option(True, "--sym/--no-sym", help="Symmetric codes (zero = 2^(bits-1)) or asymmetric min/max."),
    method: Method = typer.Option(Method.gptq, help="gptq: error-compensating GPTQ; rtn: round-to-nearest baseline."),
    calib: str = typer.Option(
        "peoples-daily",
        help="Calibration spec: comma-separated NAME[:ARG][:WEIGHT] items, e.g. "
        "'peoples-daily:0.7,belle:data.jsonl:0.3'. Names: peoples-daily, reviews, belle:PATH, txt:PATH, hf:NAME.",
    ),
    nsamples: int = typer.Option(128, help="Number of calibration sequences."),
    seqlen: int = typer.Option(None, help="Tokens per calibration sequence [default: min(2048, model context)]."),
    device: Device = typer.Option(Device.auto, help="Where blocks are quantized: auto picks cuda when available."),
    seed: int = typer.Option(0, help="Seed for calibration sampling."),
    format: Format = typer.Option(Format.gptq, "--format", help="gptq (v1, stores zero-1, vLLM's default) or gptq_v2."),
    damp_percent: float = typer.Option(
        0.01, help="Dampening of the Hessian diagonal; raised automatically if Cholesky fails."
    ),
    true_sequential: bool = typer.Option(
        True,
        "--true-sequential/--no-true-sequential",
        help="Quantize a block's Linears stage by stage, each seeing the quantized stages before it.",
    ),
    mse: bool = typer.Option(
        False, "--mse/--no-mse", help="Search a clipping range per group that minimises the quantization error."
    ),
    max_shard_size: str = typer.Option("4GB", help="Largest safetensors shard, e.g. 2GB or 500MB."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT if it exists (only once the new checkpoint is complete)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a model's own Python code to run (custom architectures)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summary."),
    resume: bool | None = typer.Option(
        None,
        "--resume/--no-resume",
        help="OUT.partial keeps the progress of a killed run, and rerunning the same command continues it "
        "[default: continue when one matches]. --resume: fail if there is none; --no-resume: delete it, start over.",
    ),
) -> None:
    """Quantize MODEL with Chinese calibration data and write a packed GPTQ checkpoint to OUT."""
    from gptqlab.quantize.options import QuantizeOptions
    from gptqlab.quantize.run import quantize as run

    opts = QuantizeOptions(
        model=model,
        out=out,
        bits=bits,
        group_size=group_size,
        act_order=act_order,
        static_groups=static_groups,
        sym=sym,
        method=method.value,
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        device=device.value,
        seed=seed,
        format=format.value,
        damp_percent=damp_percent,
        true_sequential=true_sequential,
        mse=mse,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        progress=not quiet,
        resume=resume,
    )
    path = run(opts)
    typer.echo(f"wrote {path}")


@app.command()
def verify(
    folder: str = typer.Argument(..., help="Checkpoint folder to check."),
    hashes: bool = typer.Option(
        True, "--hashes/--no-hashes", help="Check every file against SHA256SUMS (reads every byte)."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a model's own Python code to run (custom architectures)."
    ),
) -> None:
    """Check a checkpoint: SHA256SUMS, its config against its tensors, every quantized Linear present.

    Exit 0 when it is sound, 1 when it is not (one problem per line: file, tensor, what is wrong), 2 for a
    usage error.
    """
    from gptqlab.checkpoint.verify import verify as check

    report = check(folder, hashes=hashes, trust_remote_code=trust_remote_code)
    for problem in report.problems:
        typer.echo(str(problem))
    if not report.sound:
        typer.echo(f"gptqlab: {printable(folder)} is not sound: {len(report.problems)} problem(s)", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"{printable(folder)}: sound ({report.hashed} files match SHA256SUMS, {report.layers} quantized layers checked)"
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning GptqlabError into a one-line message and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Optional packages that transformers imports when present (torchao, pulled in by GPTQModel) log
    # warnings about their own builds on import; they say nothing about the user's run.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        # Without standalone mode, typer returns the code of typer.Exit and of Ctrl-C (130) instead of raising.
        code = app(args=argv, standalone_mode=False)
    except GptqlabError as exc:
        print(f"gptqlab: error: {printable(exc)}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("gptqlab: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Usage errors (typer's click exceptions) know how to print themselves and carry exit code 2.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:
        print("gptqlab: interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)
