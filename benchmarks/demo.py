"""The README demo: quantize the embedded ``tiny-zh-llama`` with Chinese calibration (GPTQ and RTN, 4-bit
and 3-bit, group size 128), evaluate each checkpoint on both held-out splits, and print a table.

Run with ``make demo`` or ``python -m gptqlab.benchmarks.demo [--model NAME] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = "tiny-zh-llama"
DATASETS = ("peoples-daily-heldout", "reviews-heldout")
SETTINGS = (("gptq", 4), ("rtn", 4), ("gptq", 3), ("rtn", 3))


def evaluate(path: str, seqlen: int, max_chars: int) -> dict[str, dict]:
    import gptqlab
    from gptqlab.calib import load_eval_text
    from gptqlab.evaluate import perplexity

    model = gptqlab.load(path, device="cpu")
    tokenizer = gptqlab.load_tokenizer(path)
    results = {}
    for name in DATASETS:
        _, text = load_eval_text(name)
        r = perplexity(model, tokenizer, text[:max_chars], seqlen=seqlen, progress=False)
        results[name] = {"ppl": r.ppl, "bits_per_char": r.bits_per_char}
    return results


def main(argv: list[str] | None = None) -> None:
    from gptqlab.quantize.options import QuantizeOptions
    from gptqlab.quantize.run import quantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="embedded model name or local folder (default: %(default)s)")
    parser.add_argument("--out", default="out/demo", help="folder for the checkpoints (default: %(default)s)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    parser.add_argument(
        "--max-chars",
        type=int,
        default=40_000,
        help="evaluate on the first N characters of each held-out split (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    print(f"evaluating {args.model} (unquantized)", flush=True)
    rows = [("unquantized", "-", evaluate(args.model, args.seqlen, args.max_chars), 0.0)]
    for method, bits in SETTINGS:
        out = Path(args.out) / f"{Path(args.model).name}-{method}-{bits}bit-g128"
        print(f"quantizing {args.model}: {method} {bits}-bit g128 -> {out}", flush=True)
        t0 = time.perf_counter()
        quantize(
            QuantizeOptions(
                model=args.model,
                out=str(out),
                bits=bits,
                method=method,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                device="cpu",
                overwrite=True,
                progress=False,
            )
        )
        seconds = time.perf_counter() - t0
        rows.append((f"{method} {bits}-bit g128", str(out), evaluate(str(out), args.seqlen, args.max_chars), seconds))

    header = f"{'model':<22}{'news ppl':>10}{'news bpc':>10}{'reviews ppl':>13}{'reviews bpc':>13}{'quantize s':>12}"
    print(
        f"\n{args.model}: held-out perplexity and bits per character "
        f"(first {args.max_chars:,} characters of each split, seqlen {args.seqlen}, CPU)"
    )
    print(header)
    print("-" * len(header))
    for label, _, res, seconds in rows:
        news, rev = res[DATASETS[0]], res[DATASETS[1]]
        print(
            f"{label:<22}{news['ppl']:>10.2f}{news['bits_per_char']:>10.3f}"
            f"{rev['ppl']:>13.2f}{rev['bits_per_char']:>13.3f}{seconds:>12.1f}"
        )
    report = Path(args.out) / "demo.json"
    report.write_text(
        json.dumps([{"setting": r[0], "path": r[1], "results": r[2], "seconds": r[3]} for r in rows], indent=2)
    )
    print(f"\nwrote {report}")


if __name__ == "__main__":
    from gptqlab.errors import GptqlabError

    try:
        main()
    except GptqlabError as exc:
        raise SystemExit(f"demo: error: {exc}") from None
