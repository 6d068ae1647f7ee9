"""``gptqlab quantize``: its flags are made from the fields of
:class:`gptqlab.quantize.options.QuantizeOptions` (type, default, help, spellings), not written out here.

:func:`parameters_of` turns each field into a typer parameter; :func:`options_from` turns the parsed
values back into a ``QuantizeOptions``. The command's signature is set from the first, so typer and
``--help`` see exactly the dataclass.
"""

from __future__ import annotations

import inspect
import os
import typing
from dataclasses import MISSING, Field, fields
from enum import Enum

import typer

from gptqlab.quantize.options import QuantizeOptions


def _escape(text: str) -> str:
    """Help text as typer's rich markup prints it literally (a ``[`` would start a style tag)."""
    return text.replace("[", "\\[")


def _choices_type(name: str, choices: tuple[str, ...]) -> type[Enum]:
    return Enum(name, {c: c for c in choices}, type=str)


def _cli_name(f: Field) -> str:
    return f.metadata.get("cli_name") or f.name


def parameters_of(cls: type = QuantizeOptions) -> list[tuple[str, object, object]]:
    """(parameter name, annotation, typer.Argument/Option) for every init field of ``cls``, in order."""
    hints = typing.get_type_hints(cls, localns={"QuantConfig": object})
    params = []
    for f in fields(cls):
        if not f.init:
            continue
        meta, annotation = f.metadata, hints[f.name]
        help_text = _escape(meta["help"])
        if meta.get("argument"):
            params.append((f.name, annotation, typer.Argument(..., help=help_text, show_default=False)))
            continue
        default = f.default if f.default is not MISSING else ...
        if meta.get("choices"):
            annotation = _choices_type(f.name.title().replace("_", ""), meta["choices"])
            default = None if default is None else annotation(default)
        if meta.get("invert"):
            default = not default
        params.append((_cli_name(f), annotation, typer.Option(default, *meta.get("decls", ()), help=help_text)))
    return params


def options_from(values: dict) -> QuantizeOptions:
    """The record for parsed CLI values keyed by parameter name (Enum members and ``--quiet`` undone)."""
    kwargs = {}
    for f in fields(QuantizeOptions):
        if not f.init:
            continue
        value = values[_cli_name(f)]
        if isinstance(value, Enum):
            value = value.value
        if f.metadata.get("invert"):
            value = not value
        kwargs[f.name] = value
    return QuantizeOptions(**kwargs)


def engine_warnings(opts: QuantizeOptions) -> list[str]:
    """Which serving engines will not serve the checkpoint these options make, and why
    (:func:`gptqlab.checkpoint.engines.quantize_warnings`); [] when the model's config cannot be read, which
    the run then reports as the error it is."""
    from gptqlab.checkpoint.engines import quantize_warnings
    from gptqlab.errors import GptqlabError
    from gptqlab.modelfiles import model_config
    from gptqlab.resolve import resolve_model_dir

    try:
        config = model_config(resolve_model_dir(opts.model), opts.trust_remote_code)
    except GptqlabError:
        return []
    return quantize_warnings(opts.quant, str(getattr(config, "model_type", "")))


def quantize(**values) -> None:
    """Quantize MODEL with Chinese calibration data and write a packed GPTQ checkpoint to OUT.

    Before the work starts it prints which serving engines (vLLM, SGLang, transformers) will not serve the
    chosen settings, and why; it does not refuse them (gptqlab.load reads every setting).

    Under torchrun (torchrun --nproc-per-node N -m gptqlab quantize MODEL OUT; gloo on the CPU, NCCL on
    GPUs, one GPU per rank) the ranks share the calibration batches and the Linears of each stage, rank 0
    writes, and the checkpoint holds the same tensors as a single process's with the same threads per process.
    """
    from gptqlab.errors import printable
    from gptqlab.quantize.run import quantize as run

    opts = options_from(values)
    if opts.progress and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone says it
        for line in engine_warnings(opts):
            typer.echo(f"warning: {printable(line)}")  # stdout: stderr is kept for the one-line error
    path = run(opts)
    if path is not None:  # None: a torchrun rank other than 0, which writes nothing
        typer.echo(f"wrote {printable(path)}")


_PARAMS = parameters_of()
quantize.__signature__ = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for n, a, d in _PARAMS]
)
quantize.__annotations__ = {n: a for n, a, _ in _PARAMS}
