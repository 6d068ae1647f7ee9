"""``torchrun ... -m gptqlab quantize`` end to end on the CPU (gloo, 2 ranks on localhost): the checkpoint's
tensors equal a single process's, rank 0 alone writes, a dead rank stops the run with one line naming it
and keeps the finished blocks, and a rerun (with or without torchrun) completes them.

Every process runs on one thread (OMP_NUM_THREADS=1): MKL splits sums across threads, so the bits depend on
the threads per process, which run.json records and every rank must share.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testkit import build_deep_llama

from gptqlab.calib.sources import builtin_texts
from gptqlab.quantize.progress import partial_dir
from gptqlab.quantize.run import SLOW_BLOCK_ENV

LAYERS = 4
LIMIT = 300  # seconds any command here may take before the test fails
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUANTIZE = [sys.executable, "-m", "gptqlab", "quantize"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A 4-layer random LLaMA (grouped KV heads), so that a run can be stopped between blocks."""
    return build_deep_llama(tmp_path_factory.mktemp("deep-llama"), tokenizer_dir, LAYERS, seed=3)


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """8 samples in forward batches of 2: 4 chunks, 2 per rank; act-order GPTQ; a short calibration file."""
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n".join(builtin_texts("peoples-daily")[:40]), encoding="utf-8")
    sizes = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--group-size", "32", "--act-order"]
    return [*sizes, "--calib", f"txt:{calib}", "--dist-timeout", "60", "-q"]


def run(cmd: list, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], env=env or ENV, capture_output=True, text=True, timeout=LIMIT, check=False
    )


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            found.update({k: h.get_tensor(k) for k in h.keys()})
    return found


def assert_same_tensors(got: Path, want: Path) -> None:
    a, b = tensors(got), tensors(want)
    assert sorted(a) == sorted(b)
    differ = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} of {len(b)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def single(deep_model, args, tmp_path_factory) -> Path:
    """The single-process checkpoint of the deep model, one thread."""
    out = tmp_path_factory.mktemp("single") / "out"
    done = run([*QUANTIZE, deep_model, out, *args])
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(("model", "ranks"), [("deep", 2), ("tiny-zh-llama", 2), ("deep", 3)])
def test_torchrun_writes_the_single_process_checkpoint(model, ranks, deep_model, single, args, tmp_path):
    """4 batches of 2 samples: 2 + 2 on 2 ranks, 1 + 1 + 2 on 3 (partial sums that are not one tree node)."""
    if model == "deep":
        name, want = deep_model, single
    else:  # the embedded model (4 blocks, hidden 128): its own single-process run
        name, want = model, tmp_path / "single"
        done = run([*QUANTIZE, name, want, *args])
        assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    launcher = [*TORCHRUN[:-1], str(ranks)]
    done = run([*launcher, "-m", "gptqlab", "quantize", name, out, *args])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and says so
    assert_same_tensors(out, want)
    report = json.loads((out / "quant_report.json").read_text())
    assert report["ranks"] == ranks and report["threads"] == 1
    assert report["settings"]["batch_size"] == 2 and report["settings"]["nsamples"] == 8
    assert not partial_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(["single"] if model != "deep" else [])])


def test_chunks_of_several_batches_keep_torchrun_bit_equal(deep_model, args, tmp_path):
    """36 samples in 18 batches of 2: more batches than the driver's 16 chunks, so each chunk holds 2 batches
    (9 chunks of 4 samples, 3 per rank on 3 ranks); still bit for bit the single-process checkpoint."""
    more = [*args, "--nsamples", "36"]
    want, out = tmp_path / "single", tmp_path / "out"
    done = run([*QUANTIZE, deep_model, want, *more])
    assert done.returncode == 0, done.stderr
    done = run([*TORCHRUN[:-1], "3", "-m", "gptqlab", "quantize", deep_model, out, *more])
    assert done.returncode == 0, done.stderr
    assert_same_tensors(out, want)
    assert json.loads((out / "quant_report.json").read_text())["settings"]["nsamples"] == 36


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(cmd: list, world: int, extra: dict) -> list[subprocess.Popen]:
    """The ranks of ``cmd`` with the environment torchrun gives them, but no agent that stops the others
    when one dies, so that the survivors' own report can be read."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {
            **ENV,
            **extra,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


@pytest.mark.parametrize("rerun", ["single", "torchrun"])
def test_a_dead_rank_is_named_and_a_rerun_completes_the_run(rerun, deep_model, single, args, tmp_path):
    out = tmp_path / "out"
    # Rank 0 sleeps 1 s after each block before saving it, so rank 1 is killed with blocks still to do.
    procs = launch_ranks([*QUANTIZE, deep_model, out, *args], 2, {SLOW_BLOCK_ENV: "1"})
    try:
        block0 = partial_dir(out) / "blocks" / "block-00000.safetensors"
        deadline = time.monotonic() + LIMIT
        while not block0.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert block0.exists(), procs[0].communicate(timeout=5)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=LIMIT)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("gptqlab: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("gptqlab: error: rank 1 stopped while "), errors[0]
    assert "finished blocks are kept in" in errors[0] and "rerun the same command to resume" in errors[0]
    assert not out.exists()
    finished = sorted(p.name for p in (partial_dir(out) / "blocks").glob("block-*.safetensors"))
    assert "block-00000.safetensors" in finished and len(finished) < LAYERS

    cmd = [*QUANTIZE, deep_model, out, *args]
    done = run(cmd if rerun == "single" else [*TORCHRUN, "-m", "gptqlab", "quantize", deep_model, out, *args])
    assert done.returncode == 0, done.stderr
    assert "continuing at block" in done.stderr
    assert json.loads((out / "quant_report.json").read_text())["resumed_at_block"] >= 1
    assert not partial_dir(out).exists()
    assert_same_tensors(out, single)


def test_bad_input_found_by_rank_0_stops_every_rank_with_one_line(deep_model, args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run([*TORCHRUN, "-m", "gptqlab", "quantize", deep_model, out, *args])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("gptqlab: error:")]
    assert errors == [f"gptqlab: error: output {out} already exists; pass --overwrite to replace it"], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_more_ranks_than_batches_is_refused(deep_model, args, tmp_path):
    out = tmp_path / "out"
    few = [*args, "--nsamples", "2"]  # one forward batch of 2 samples for 2 ranks
    done = run([*TORCHRUN, "-m", "gptqlab", "quantize", deep_model, out, *few])
    assert done.returncode != 0
    assert "2 ranks but the samples make only 1 Hessian chunk of up to 2 samples (2 per forward batch)" in done.stderr
    assert not out.exists() and not partial_dir(out).exists()


def rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the rank that writes ``out`` (found by its command line and RANK), or None."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_under_torchrun_a_killed_rank_publishes_nothing_and_keeps_the_blocks(deep_model, single, args, tmp_path):
    """torchrun's agent stops the other ranks (SIGTERM) as soon as one dies and names the first failure
    itself; gptqlab must publish nothing and leave OUT.partial consistent, so that a rerun completes it."""
    out = tmp_path / "out"
    cmd = [str(c) for c in [*TORCHRUN, "-m", "gptqlab", "quantize", deep_model, out, *args]]
    proc = subprocess.Popen(cmd, env={**ENV, SLOW_BLOCK_ENV: "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        block0 = partial_dir(out) / "blocks" / "block-00000.safetensors"
        deadline = time.monotonic() + LIMIT
        while not block0.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = rank_pid(out, 1)
        assert block0.exists() and pid is not None
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert not out.exists() and block0.exists()
    done = run([*QUANTIZE, deep_model, out, *args])
    assert done.returncode == 0, done.stderr
    assert "continuing at block" in done.stderr
    assert_same_tensors(out, single)
