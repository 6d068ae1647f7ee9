"""``gptqlab eval``: evaluation commands. Each option maps one to one onto an argument of
:func:`gptqlab.benchmarks.eval_ppl.run`; bad input raises GptqlabError (one line, exit 2)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Evaluate models: perplexity and bits per character.", no_args_is_help=True)

DEVICE_HELP = "Device to run on: auto (cuda when available), cpu, cuda or cuda:N."


@app.command()
def ppl(
    model: str = typer.Argument(
        ..., help="GPTQ checkpoint or unquantized model: embedded name (tiny-zh-llama, tiny-zh-bloom) or folder."
    ),
    dataset: list[str] = typer.Option(
        ["peoples-daily-heldout"],
        "--dataset",
        "-d",
        help="Evaluation text, repeatable or a comma list: peoples-daily-heldout, reviews-heldout, a .txt or "
        "BELLE .json/.jsonl file, or hf:NAME[@CONFIG][#COLUMN][:SPLIT].",
    ),
    seqlen: int = typer.Option(512, help="Tokens per window (at most the model's context)."),
    stride: int = typer.Option(
        None, help="Tokens newly scored per window, 1..seqlen (default: seqlen, i.e. disjoint windows)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_chars: int = typer.Option(None, help="Score only the first N characters of each text (default: all)."),
    batch_size: int = typer.Option(1, help="Windows per forward pass; changes speed, not the result."),
    json: str = typer.Option(
        None,
        "--json",
        help="Write the results to this JSON file: {model, dataset, seqlen, tokens, chars, ppl, bits_per_char, "
        "...} (a list for several datasets).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Perplexity and bits per character of MODEL on held-out Chinese text."""
    from gptqlab.benchmarks.common import split_list
    from gptqlab.benchmarks.eval_ppl import run

    run(
        model,
        split_list(dataset),
        seqlen=seqlen,
        stride=stride,
        device=device,
        max_chars=max_chars,
        batch_size=batch_size,
        json_path=json,
        progress=not quiet,
    )
