"""``gptqlab eval``: evaluation commands. Each option maps one to one onto an argument of
:func:`gptqlab.evaluate.evaluate`; bad input raises GptqlabError (one line, exit 2)."""

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
        None, help="Tokens newly scored per window, 1..seqlen. Default: seqlen, i.e. disjoint windows."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    max_chars: int = typer.Option(
        40_000,
        help="Score N characters of each text (about 28,000 tokens of the embedded models' tokenizer; the "
        "held-out splits hold 181,151 and 136,123). Give a larger N to score more.",
    ),
    spread: bool = typer.Option(
        True,
        "--spread/--head",
        help="Take the N characters as 8 runs of whole lines spread over the text, or as its first N "
        "(a prefix can misrepresent a sorted text such as the reviews).",
    ),
    batch_size: int = typer.Option(
        None, help="Windows per forward pass; changes speed, not the result. Default: 8 on CUDA, 1 on the CPU."
    ),
    threads: int = typer.Option(
        None,
        help="torch CPU threads while scoring. Default: 1 for models under 100M parameters on the CPU (small "
        "matmuls lose more to thread synchronisation than they gain), else torch's default.",
    ),
    backend: str = typer.Option(
        "auto",
        help="Quantized layers' implementation, as for gptqlab.load: auto (Triton on CUDA; on the CPU torch's "
        "int4 kernel with bf16 scales, which moved tiny-zh-llama 4-bit's perplexity by 0.01 %), triton, or "
        "torch (the exact GPTQ weight, slower).",
    ),
    json: str = typer.Option(
        None,
        "--json",
        help="Write the results to this JSON file: {model, dataset, seqlen, tokens, chars, ppl, bits_per_char, "
        "...} (a list for several datasets), with the environment under env.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar. Default: off."),
) -> None:
    """Perplexity and bits per character of MODEL on held-out Chinese text."""
    from gptqlab.cli.report import env_line, environment, split_list, table, write_json
    from gptqlab.evaluate import evaluate

    rows, dev, used_threads = evaluate(
        model,
        split_list(dataset),
        seqlen=seqlen,
        stride=stride,
        device=device,
        max_chars=max_chars,
        spread_out=spread,
        batch_size=batch_size,
        threads=threads,
        backend=backend,
        progress=not quiet,
    )
    env = {**environment(dev), "torch_threads": used_threads}
    typer.echo(env_line(env))
    headers = ["model", "dataset", "seqlen", "stride", "tokens", "chars", "ppl", "bits/char"]
    keys = ["model", "dataset", "seqlen", "stride", "tokens", "chars", "ppl", "bits_per_char"]
    typer.echo(table(headers, [[r[k] for k in keys] for r in rows]))
    if json is not None:
        records = [{**r, "env": env} for r in rows]
        typer.echo(f"wrote {write_json(json, records[0] if len(records) == 1 else records)}")
