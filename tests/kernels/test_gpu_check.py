"""``python -m gptqlab.benchmarks.gpu_check --dry-run``: every step of the GPU check runs on the CPU.

The dry run shrinks every size, runs the kernels in triton's interpreter (fp16 only: the interpreter's
bf16 dot is wrong, triton#11584) and writes the same JSON and Markdown the GPU run writes, marked as a
dry run. It checks the plumbing: that each step runs, that correctness is judged, and that the report
names device, date and commit. Its times are interpreter times and are not asserted. About 2 minutes on
2 busy cores, most of it quantizing tiny-zh-llama and the interpreted decode.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    cmd = [sys.executable, "-m", "gptqlab.benchmarks.gpu_check", "--dry-run", "--out-dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=out)
    return run, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_step_runs_and_passes(dry_run):
    run, report, _ = dry_run
    assert run.returncode == 0, run.stderr[-4000:]
    assert report["errors"] == {}
    assert {"correctness", "timing", "probe", "table", "quantize", "decode"} <= report.keys()


def test_correctness_covers_the_batches_and_act_order(dry_run):
    _, report, _ = dry_run
    rows = report["correctness"]
    assert {r["M"] for r in rows} == {1, 7, 16, 33} and {r["kernel"] for r in rows} == {"gemv", "gemm"}
    assert {r["variant"] for r in rows} == {"plain", "bias+act-order"}
    assert all(r["ok"] and r["max_rel_err"] <= r["limit"] for r in rows)


def test_sections_have_their_rows(dry_run):
    _, report, markdown = dry_run
    assert {r["M"] for r in report["timing"]} == {1, 16, 33}
    assert all(r["kernel_us"] > 0 and r["call_us"] > 0 for r in report["timing"])
    assert {r["M"] for r in report["probe"]} == {1, 16} and all(r["probe_us"] > 0 for r in report["probe"])
    assert len(report["table"]) == 6 and all(r["fp16_us"] > 0 and r["config"] for r in report["table"])
    assert report["quantize"]["identical_packed_words"] == 1.0  # the dry run compares a CPU run with itself
    assert report["decode"]["linears"] == 7 and report["decode"]["int4_ms_per_token"] > 0
    meta = report["meta"]
    assert meta["dry_run"] and meta["device"] == "cpu-interpreter" and meta["commit"] and meta["date"]
    assert "dry run: CPU interpreter, times meaningless" in markdown


def test_markdown_reports_skipped_steps_without_failing():
    from gptqlab.benchmarks.gpu_check import markdown

    meta = {"device": "X", "date": "d", "commit": "c", "torch": "t", "triton": "t", "seconds": 1.0, "dry_run": False}
    report = {
        "meta": meta,
        "errors": {"decode": "RuntimeError: boom"},
        "correctness": {"skipped": "time budget: 10 s left of 480"},
        "table": [{"shape": "s", "M": 1, "skipped": "time budget"}],
        "quantize": {"skipped": "time budget: 5 s left of 480"},
    }
    text = markdown(report)
    assert "Skipped for time: correctness, quantize" in text and "- decode: RuntimeError: boom" in text
    assert "| s | 1 |" not in text


def test_without_a_gpu_the_full_check_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cmd = [sys.executable, "-m", "gptqlab.benchmarks.gpu_check"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: gpu_check needs a CUDA GPU; use --dry-run to run the plumbing on the CPU"
    )
