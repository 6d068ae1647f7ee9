"""The ``gptqlab`` command line.

Bad input raises :class:`gptqlab.errors.GptqlabError`; :func:`main` prints it as one line on stderr and
exits with code 2, without a traceback. Under torchrun, a rank that died or stopped answering
(:class:`~gptqlab.quantize.distributed.RankFailure`) or failed on a bug while solving a Linear
(:class:`~gptqlab.quantize.distributed.RemoteError`) is one line too, with exit code 1. ``quantize``'s
options are the fields of :class:`gptqlab.quantize.options.QuantizeOptions` (:mod:`gptqlab.cli.quantize`).
"""

from __future__ import annotations

import logging
import sys
from enum import Enum

import typer

from gptqlab.checkpoint.engines import ENGINES
from gptqlab.cli.bench import app as bench_app
from gptqlab.cli.eval import app as eval_app
from gptqlab.cli.quantize import quantize
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


app.command()(quantize)


Engine = Enum("Engine", {key: key for key in ENGINES}, type=str)


@app.command()
def verify(
    folder: str = typer.Argument(..., help="Checkpoint folder to check."),
    hashes: bool = typer.Option(
        True, "--hashes/--no-hashes", help="Check every file against SHA256SUMS (reads every byte)."
    ),
    engine: Engine = typer.Option(
        None,
        help="Check instead whether this serving engine can serve the checkpoint as written (vLLM 0.33.0, "
        "SGLang 0.5.23, transformers 5): exit 0 when it can, else 1 with one line per reason. "
        "Default: check soundness, then print one line saying which engines can serve it.",
    ),
    tp: int = typer.Option(
        1,
        help="With --engine vllm or sglang: the number of GPUs for tensor parallelism; checks that the "
        "attention and KV heads and every quantized Linear's share fit the engine's GPTQ kernel.",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a model's own Python code to run (custom architectures)."
    ),
) -> None:
    """Check a checkpoint: SHA256SUMS, its config against its tensors, every quantized Linear present, and
    which serving engines can serve it.

    Exit 0 when it is sound, 1 when it is not (one problem per line: file, tensor, what is wrong), 2 for a
    usage error. With --engine: 0 when that engine can serve it, 1 with one line per reason.
    """
    from gptqlab.checkpoint import engines

    if engine is not None:
        ckpt = engines.read_checkpoint(folder, trust_remote_code)
        problems = engines.serving_problems(ckpt, engine.value, tp)
        label = engines.ENGINES[engine.value].label
        for problem in problems:
            typer.echo(printable(problem))
        if problems:
            typer.echo(f"gptqlab: {label} cannot serve {printable(folder)}: {len(problems)} reason(s)", err=True)
            raise typer.Exit(1)
        typer.echo(f"{printable(folder)}: {label} can serve it on {tp} GPU(s) ({engines.ENGINES[engine.value].notes})")
        return

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
    typer.echo(engines.summary_line(engines.read_checkpoint(folder, trust_remote_code)))


def _is_rank_error(exc: Exception) -> bool:
    """Whether ``exc`` is a torchrun rank's failure (imported only when torch.distributed was used)."""
    distributed = sys.modules.get("gptqlab.quantize.distributed.context")
    return distributed is not None and isinstance(exc, distributed.RankFailure | distributed.RemoteError)


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
        if not getattr(exc, "quiet", False):  # quiet: another rank reports it
            print(f"gptqlab: error: {printable(exc)}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("gptqlab: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if _is_rank_error(exc):
            line = "; ".join([str(exc), *getattr(exc, "__notes__", [])])
            print(f"gptqlab: error: {printable(line)}", file=sys.stderr)
            sys.exit(1)
        # Usage errors (typer's click exceptions) know how to print themselves and carry exit code 2.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:
        print("gptqlab: interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)
