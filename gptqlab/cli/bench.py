"""``gptqlab bench``: the benchmark commands behind every number gptqlab claims. Each prints a table and
writes JSON with ``--json``; committed results live under ``benchmarks/results/<device>/``. Options map one
to one onto the arguments of the ``run`` functions in ``gptqlab.benchmarks``; bad input raises
GptqlabError (one line, exit 2)."""

from __future__ import annotations

import typer

from gptqlab.cli.eval import DEVICE_HELP

app = typer.Typer(help="Benchmarks: latency, kernels, and gptqlab against its peers.", no_args_is_help=True)

JSON_HELP = "Write the results (with date, git commit, device and library versions) to this JSON file."
THREADS_HELP = "torch CPU threads (default: torch's); 1 gives steadier timings on a CPU shared with other jobs."
LOAD_THREADS_HELP = (
    "torch CPU threads (default: gptqlab.load's: 1 on machines with at most 2 cores or for models below 100 M "
    "parameters, else torch's); 1 gives steadier timings on a CPU shared with other jobs."
)


@app.command()
def latency(
    model: str = typer.Argument(..., help="GPTQ checkpoint or unquantized model: embedded name or folder."),
    compare: str = typer.Option(
        "auto",
        help="Baseline measured side by side in the same run: a model name or folder; 'auto' = the model named "
        "in MODEL's quant_report.json (if it exists); 'none' = no baseline.",
    ),
    batch_sizes: str = typer.Option("1,4,16", help="Comma list of batch sizes."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per sequence (prefill)."),
    gen_len: int = typer.Option(32, help="Decode steps after the prompt (one token per sequence each)."),
    repeats: int = typer.Option(5, help="Timed runs after one warm-up; medians are reported."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    backend: str = typer.Option(
        "auto",
        help="QuantLinear implementation: auto (Triton on CUDA; on the CPU torch's int4 kernel on weights "
        "repacked at load time), triton, or torch (the exact reference; slow).",
    ),
    threads: int = typer.Option(None, help=LOAD_THREADS_HELP),
    json: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """Prefill time, decode ms/token, tokens/s and peak memory of MODEL and its baseline."""
    from gptqlab.benchmarks.bench_latency import run
    from gptqlab.benchmarks.common import parse_ints

    run(
        model,
        compare=compare,
        batch_sizes=parse_ints(batch_sizes, "--batch-sizes"),
        prompt_len=prompt_len,
        gen_len=gen_len,
        repeats=repeats,
        device=device,
        backend=backend,
        threads=threads,
        json_path=json,
    )


@app.command()
def kernels(
    shapes: list[str] = typer.Option(
        ["llama-7b,bloom-7b1,qwen2-7b"],
        "--shapes",
        help="Layer shapes, repeatable or a comma list: llama-7b, bloom-7b1, qwen2-7b (their real layers) or "
        "custom KxN (in x out features, K a multiple of 32).",
    ),
    bits: str = typer.Option("4,8", help="Comma list of bit widths (2, 3, 4, 8; 3-bit has no Triton kernel)."),
    batches: str = typer.Option("1,16,256", help="Comma list of activation rows M (batch x tokens)."),
    group_size: int = typer.Option(128, help="Rows per quantization group; -1 = one group."),
    shrink: int = typer.Option(
        None, help="Divide the model shapes' K and N by this (default: 1 on CUDA, 8 on the CPU); KxN is kept."
    ),
    repeats: int = typer.Option(
        None,
        help="Timed runs per point, median reported (default: 30 on CUDA, 10 on CPU). On the CPU each repeat is "
        "one call per kernel in rotating order, with the cache flushed before each call for layers whose dense "
        "fp32 weight is at least 1 MiB.",
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    threads: int = typer.Option(None, help=THREADS_HELP),
    json: str = typer.Option(None, "--json", help=JSON_HELP),
) -> None:
    """gptqlab's GPTQ matmul vs a dense matmul at real layer shapes: µs, TFLOP/s, GB/s, % of peak bandwidth."""
    from gptqlab.benchmarks.bench_kernels import run
    from gptqlab.benchmarks.common import parse_ints

    run(
        shapes=shapes,
        bits=parse_ints(bits, "--bits"),
        batches=parse_ints(batches, "--batches"),
        group_size=group_size,
        shrink=shrink,
        repeats=repeats,
        device=device,
        threads=threads,
        json_path=json,
    )


@app.command()
def peers(
    models: str = typer.Option(
        "tiny-zh-llama,tiny-zh-bloom,random-llama-2048",
        help="Comma list of embedded model names or folders; random-llama-2048 / random-llama-4096 (a 2-layer random "
        "LLaMA of that hidden size, built once) are timed against GPTQModel for speed and peak memory only.",
    ),
    settings: str = typer.Option(
        "w4g128,w4g128-act,w3g128,w8g128",
        help="Comma list of settings wBITSgGROUP[-act]: e.g. w4g128 (4-bit, group 128), w4g128-act (act-order).",
    ),
    tools: str = typer.Option(
        "gptqlab-gptq,gptqlab-rtn,gptqmodel", help="Comma list of quantizers: gptqlab-gptq, gptqlab-rtn, gptqmodel."
    ),
    datasets: str = typer.Option(
        "peoples-daily-heldout,reviews-heldout", help="Comma list of evaluation texts (as for gptqlab eval ppl)."
    ),
    calib: str = typer.Option("peoples-daily", help="Calibration spec given to every quantizer (same tokens)."),
    nsamples: int = typer.Option(128, help="Calibration sequences."),
    seqlen: int = typer.Option(512, help="Tokens per calibration sequence."),
    seed: int = typer.Option(0, help="Seed for calibration sampling."),
    damp: float = typer.Option(0.01, help="damp_percent for every GPTQ run (gptqlab and GPTQModel)."),
    eval_seqlen: int = typer.Option(512, help="Tokens per perplexity window."),
    max_chars: int = typer.Option(40_000, help="Score the first N characters of each evaluation text."),
    batch_size: int = typer.Option(8, help="Perplexity windows per forward pass (speed only)."),
    domain: bool = typer.Option(
        True, "--domain/--no-domain", help="Also calibrate gptqlab GPTQ on each --domain-calib source."
    ),
    domain_calib: list[str] = typer.Option(
        ["news=peoples-daily", "reviews=reviews", "mix 50/50=peoples-daily:0.5,reviews:0.5"],
        "--domain-calib",
        help="Calibration source of the domain table as LABEL=SPEC, repeatable.",
    ),
    domain_bits: int = typer.Option(3, help="Bits of the calibration-domain runs (3: differences are visible)."),
    domain_group_size: int = typer.Option(128, help="Group size of the calibration-domain runs."),
    speed_nsamples: int = typer.Option(16, help="Calibration sequences for the random-llama speed runs."),
    speed_seqlen: int = typer.Option(256, help="Tokens per calibration sequence in the random-llama speed runs."),
    speed_repeats: int = typer.Option(
        2, help="Runs of each tool on each random-llama model, alternating the tools; medians are reported."
    ),
    device: str = typer.Option("cpu", help="Where quantizers and evaluation run: cpu, cuda or auto."),
    threads: int = typer.Option(
        None, help="torch threads in this process and OMP_NUM_THREADS in every quantizer's (default: torch's)."
    ),
    work_dir: str = typer.Option(None, help="Keep checkpoints, job files and quantizer logs here (default: temp)."),
    json: str = typer.Option(None, "--json", help=JSON_HELP),
    plot: str = typer.Option(None, "--plot", help="Write PNG charts (perplexity, cost, domain) to this folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """gptqlab GPTQ vs gptqlab RTN vs GPTQModel vs fp16 on the embedded models, and the calibration domain
    effect; prints PASS/MISS for the quality and speed targets."""
    from gptqlab.benchmarks.bench_peers import PeersOptions, run
    from gptqlab.cli.report import split_list

    opts = PeersOptions(
        models=split_list(models),
        settings=split_list(settings),
        tools=split_list(tools),
        datasets=split_list(datasets),
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        damp_percent=damp,
        eval_seqlen=eval_seqlen,
        max_chars=max_chars,
        batch_size=batch_size,
        domain=domain,
        domain_calibs=domain_calib,
        domain_bits=domain_bits,
        domain_group_size=domain_group_size,
        speed_nsamples=speed_nsamples,
        speed_seqlen=speed_seqlen,
        speed_repeats=speed_repeats,
        device=device,
        threads=threads,
        work_dir=work_dir,
        json_path=json,
        plot_dir=plot,
        progress=not quiet,
    )
    run(opts)
