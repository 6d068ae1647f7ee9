"""The static report (gptqlab.benchmarks.kernel_static) and the static targets of the decode kernel.

The module fixture runs the CI size of the report (4096 x 4096 at M = 1 and 16, every gemv config the
autotuner keeps; about a minute on 2 cores) in a subprocess, because it must import triton without
TRITON_INTERPRET. The targets checked here are the issue's static ones: at most 2.5 SASS instructions per
4-bit weight in the main loop of the selected configs, one launch per call, no spills. The model's
arithmetic is checked on its own, without compiling.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from gptqlab.benchmarks import kernel_static as ks

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "gptqlab.benchmarks.kernel_static", "--small"]
    cmd += ["--json", str(out / "r.json"), "--sass-dir", str(out / "sass")]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads((out / "r.json").read_text())
    data["sass_dir"] = out / "sass"
    data["stdout"] = run.stdout
    data["markdown"] = (out / "r.md").read_text()
    return data


@needs_triton
def test_report_rows_have_the_issue_fields(report):
    fields = {"kernel", "config", "selected", "M", "K", "N", "bits", "registers", "spill_bytes", "smem_bytes"}
    fields |= {"loop_instructions", "weights_per_thread_per_iteration", "instructions_per_weight", "sass_file"}
    fields |= {"launches_per_call", "predicted_us_h100", "predicted_speedup_vs_fp16_h100", "predicted_us_h200"}
    fields |= {"predicted_speedup_vs_fp16_h200"}
    rows = report["rows"]
    assert {(r["M"], r["K"], r["N"]) for r in rows} == {(1, 4096, 4096), (16, 4096, 4096)}
    assert all(fields <= r.keys() for r in rows)
    assert all((report["sass_dir"] / r["sass_file"]).stat().st_size > 10_000 for r in rows)
    for m in (1, 16):  # one selected config per point, and it is among the fastest predicted
        point = [r for r in rows if r["M"] == m]
        (chosen,) = [r for r in point if r["selected"]]
        assert chosen["predicted_us_h100"] <= min(r["predicted_us_h100"] for r in point) + 0.01


@needs_triton
def test_selected_decode_configs_meet_the_static_targets(report):
    for r in (r for r in report["rows"] if r["selected"]):
        assert r["instructions_per_weight"] <= 2.5, r
        assert r["spill_bytes"] == 0, r
        assert r["launches_per_call"] == 1, r
        # the loop dequantizes with LOP3 (magic number) and paired fp16 ops, and multiplies on tensor cores
        opcodes = r["loop_opcodes"]
        assert opcodes.get("LOP3.LUT", 0) >= r["weights_per_thread_per_iteration"] / 2
        assert opcodes.get("HMMA.16816.F32", 0) > 0 and opcodes.get("HADD2", 0) > 0
        assert "I2F" not in " ".join(opcodes)  # zero points convert once per tile, not per weight
    assert report["meta"]["launches_per_call"] == {"gemv": 1, "gemm": 1, "gemv_act_order": 1, "gemm_act_order": 1}


@needs_triton
def test_no_gemv_config_spills(report):
    assert [r["config"] for r in report["rows"] if r["spill_bytes"]] == []


@needs_triton
def test_summary_marks_predictions(report):
    assert "pred x fp16 H100" in report["stdout"] and "launches per call" in report["stdout"]
    table = report["markdown"]
    assert "**Times and speedups are predictions**" in table and table.count("| gemv |") == 2


# -- the model, without compiling --------------------------------------------------------------------------
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R1, 0x1, RZ ;
        /*0020*/                   LOP3.LUT R3, R2, 0xf000f, R4, 0xea, !PT ;
        /*0030*/                   NOP ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   HADD2 R5, R3, -R6.H0_H0 ;
        /*0060*/                   HMMA.16816.F32 R8, R12, R16, R8 ;
        /*0070*/                   HMMA.16816.F32 R8, R12, R18, R8 ;
        /*0080*/              @!P1 BRA 0x50 ;
        /*0090*/                   EXIT ;
"""


def test_main_loop_is_the_largest_innermost_loop_without_nops():
    instructions = ks.sass_instructions(SASS)
    assert len(instructions) == 9  # the NOP is dropped
    loop = ks.main_loop(instructions)
    assert [t.split()[0] for t in loop] == ["HADD2", "HMMA.16816.F32", "HMMA.16816.F32", "@!P1"]
    assert ks.opcode_histogram(loop) == {"HMMA.16816.F32": 2, "HADD2": 1, "BRA": 1}


def test_fp16_baseline_is_bytes_over_cublas_bandwidth():
    h100 = ks.GPUS["h100"]
    expected = (2 * 4096 * 4096 + 2 * (4096 + 4096)) / (ks.CUBLAS_EFFICIENCY * h100.hbm_bytes_per_s)
    assert ks.fp16_baseline(h100, 1, 4096, 4096) == pytest.approx(expected)
    # at M = 4096 the tensor cores bound it instead
    flops = 2 * 4096**3 / (h100.fp16_flops * ks.MMA_EFFICIENCY)
    assert ks.fp16_baseline(h100, 4096, 4096, 4096) == pytest.approx(flops)


def test_occupancy_and_prediction_arithmetic():
    h100 = ks.GPUS["h100"]
    assert ks.programs_per_sm(h100, 128, 0, 4) == 4  # 128 regs x 128 threads = 16 K registers per program
    assert ks.programs_per_sm(h100, 255, 100 * 1024, 1) == 2  # shared memory bounds it
    row = {
        "kernel": "gemv",
        "M": 1,
        "K": 4096,
        "N": 4096,
        "bits": 4,
        "group_size": 128,
        "params": {"BLOCK_N": 128, "BLOCK_KP": 16, "SPLIT_K": 8},
        "num_warps": 2,
        "num_stages": 3,
        "registers": 200,
        "smem_bytes": 20000,
        "loop_instructions": 600,
        "other_instructions": 600,
    }
    p = ks.predict(h100, row)
    nbytes = ks.compulsory_bytes(1, 4096, 4096, 4, 128, 8)
    assert nbytes == 4096 * 4096 // 2 + 32 * 4096 * 3 + 2 * 8192 + 8 * 4096 * 4
    assert p["bound"] == "memory" and p["programs"] == 256
    expected = nbytes / (ks.STREAM_EFFICIENCY * h100.hbm_bytes_per_s) + ks.SPLIT_K_TAIL
    assert p["us"] == pytest.approx(expected * 1e6)
    # ten times the loop instructions make the same config issue bound and slower
    slow = ks.predict(h100, {**row, "loop_instructions": 6000})
    assert slow["bound"] == "issue" and slow["us"] > 2 * p["us"]


def test_bad_group_size_is_a_one_line_error(tmp_path, capsys):
    assert ks.main(["--json", str(tmp_path / "r.json"), "--sass-dir", str(tmp_path), "--group-size", "12"]) == 2
    assert capsys.readouterr().out.strip() == "error: --group-size must be -1 or a positive multiple of 8, got 12"
    assert not (tmp_path / "r.json").exists()
