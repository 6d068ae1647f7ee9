"""A newcomer's first run, timed: ``make demo``'s program, the default ``gptqlab quantize tiny-zh-llama OUT``
and ``gptqlab eval ppl`` on both held-out splits, each as a fresh process (imports included), against the
targets of a fast first run (demo ≤ 240 s, quantize ≤ 30 s, eval ≤ 60 s on a 2-core CPU).

    python -m gptqlab.benchmarks.first_run --json benchmarks/results/cpu-2core/first_run.json

Installation is not timed. Each command runs once: these are wall times of a whole program on whatever
load the machine has, so the JSON keeps the load average next to each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

PY = [sys.executable, "-m"]
EVAL_SPLITS = "peoples-daily-heldout,reviews-heldout"
STEPS = (
    # name, target seconds, command ({work} is a temporary folder; OUT folders are fresh inside it)
    ("make demo (python -m gptqlab.benchmarks.demo)", 240.0, [*PY, "gptqlab.benchmarks.demo", "--out", "{work}/demo"]),
    ("gptqlab quantize tiny-zh-llama OUT (defaults)", 30.0, [*PY, "gptqlab", "quantize", "tiny-zh-llama", "{work}/q"]),
    (
        "gptqlab eval ppl tiny-zh-llama, both held-out splits",
        60.0,
        [*PY, "gptqlab", "eval", "ppl", "tiny-zh-llama", "-d", EVAL_SPLITS],
    ),
)


def run(json_path: str | None) -> list[dict]:
    import torch

    from gptqlab.cli.report import env_line, environment, table, write_json

    rows = []
    with tempfile.TemporaryDirectory(prefix="gptqlab-first-run-") as work:
        for name, target, command in STEPS:
            argv = [part.format(work=work) for part in command]
            load = os.getloadavg()[0]
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
                raise SystemExit(f"first_run: {name} failed with exit code {done.returncode}: {tail[0]}")
            status = "PASS" if seconds <= target else "MISS"
            rows.append(
                {
                    "step": name,
                    "seconds": round(seconds, 1),
                    "target_seconds": target,
                    "status": status,
                    "load_average_before": round(load, 2),
                }
            )
            print(f"{name}: {seconds:.1f} s (target {target:.0f} s) {status}", flush=True)
    env = environment(torch.device("cpu"))
    print(env_line(env))
    print(
        table(
            ["step", "seconds", "target s", "status"],
            [[r["step"], r["seconds"], r["target_seconds"], r["status"]] for r in rows],
        )
    )
    if json_path:
        write_json(json_path, {"env": env, "rows": rows})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows with the environment to this JSON file")
    args = parser.parse_args(argv)
    run(args.json)


if __name__ == "__main__":
    main()
