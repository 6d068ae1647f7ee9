"""Resuming ``gptqlab quantize`` from ``OUT.partial``: after SIGKILL, a crash between two writes, a full disk;
the result must be byte-identical to an uninterrupted run. Settings that differ are refused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testkit import build_deep_llama, run_cli

from gptqlab.calib.sources import builtin_texts
from gptqlab.quantize.progress import partial_dir
from gptqlab.quantize.run import SLOW_BLOCK_ENV

LAYERS = 4
SLOW_SECONDS = "2"  # each block of the killed run sleeps this long between quantizing and saving


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A 4-layer random LLaMA, so that a run can be killed with blocks before and after."""
    return build_deep_llama(tmp_path_factory.mktemp("deep-llama"), tokenizer_dir, LAYERS, seed=1)


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """Small GPTQ settings with a short calibration file (tokenizing the built-in corpus takes seconds)."""
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text("\n".join(builtin_texts("peoples-daily")[:40]), encoding="utf-8")
    return ["--nsamples", "8", "--seqlen", "32", "--group-size", "32", "--act-order", "--calib", f"txt:{calib}", "-q"]


@pytest.fixture(scope="module")
def reference(deep_model, args, tmp_path_factory) -> Path:
    """An uninterrupted run in this process."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_cli(["quantize", deep_model, out, *args]) == 0
    return out


def tensor_bytes(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint as (dtype, shape, raw bytes)."""
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k).contiguous()
                found[k] = (str(t.dtype), tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    return found


def assert_identical(out: Path, reference: Path) -> None:
    got, want = tensor_bytes(out), tensor_bytes(reference)
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k] != want[k]]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"
    digest = [hashlib.sha256((f / "model.safetensors").read_bytes()).hexdigest() for f in (out, reference)]
    assert digest[0] == digest[1]


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def next_block(out: Path) -> int:
    with safe_open(str(partial_dir(out) / "state.safetensors"), framework="pt") as h:
        return int(h.metadata()["next_block"])


def test_sigkill_in_the_middle_of_a_block_then_resume_is_byte_identical(deep_model, args, tmp_path):
    cmd = [sys.executable, "-m", "gptqlab.cli", "quantize", str(deep_model)]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run([*cmd, str(ref), *args], check=True, capture_output=True)

    proc = subprocess.Popen(
        [*cmd, str(out), *args],
        env={**os.environ, SLOW_BLOCK_ENV: SLOW_SECONDS},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    block1 = partial_dir(out) / "blocks" / "block-00001.safetensors"
    deadline = time.monotonic() + 300
    while not block1.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # Block 2 is now being quantized or sleeping before its save; block 1's state may be mid-write.
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert block1.exists() and not out.exists()
    assert not (partial_dir(out) / "blocks" / "block-00003.safetensors").exists()

    resumed = subprocess.run([*cmd, str(out), *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "continuing at block" in resumed.stderr
    report = json.loads((out / "quant_report.json").read_text())
    assert report["resumed_at_block"] in (1, 2)
    assert len(report["layers"]) == 7 * LAYERS
    assert not partial_dir(out).exists()
    assert_identical(out, ref)


@pytest.fixture(scope="module")
def interrupted(deep_model, args, tmp_path_factory) -> Path:
    """OUT.partial of a run stopped by Ctrl-C after block 1 was stored (tests work on copies of it)."""
    import gptqlab.quantize.progress

    out = tmp_path_factory.mktemp("interrupted") / "out"
    real_save = gptqlab.quantize.progress.save_atomic

    def interrupt_saving_block_2(tensors, path, metadata=None):
        if path.name == "block-00002.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.progress, "save_atomic", interrupt_saving_block_2)
        assert run_cli(["quantize", deep_model, out, *args]) == 130
    assert next_block(out) == 2
    return partial_dir(out)


def copy_of(interrupted: Path, tmp_path: Path) -> Path:
    """An OUT whose OUT.partial is a copy of the interrupted run's."""
    out = tmp_path / "out"
    shutil.copytree(interrupted, partial_dir(out))
    return out


def test_ctrl_c_keeps_progress_and_says_so(deep_model, args, tmp_path, caplog, capsys):
    import gptqlab.quantize.progress

    out = tmp_path / "out"
    real_save = gptqlab.quantize.progress.save_atomic

    def interrupt_saving_block_1(tensors, path, metadata=None):
        if path.name == "block-00001.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.progress, "save_atomic", interrupt_saving_block_1)
        assert run_cli(["quantize", deep_model, out, *args]) == 130
    assert "gptqlab: interrupted" in capsys.readouterr().err
    assert "1 finished blocks are kept" in caplog.text and "rerun the same command to resume" in caplog.text
    assert listing(partial_dir(out)) == ["blocks", "blocks/block-00000.safetensors", "run.json", "state.safetensors"]


def test_crash_between_block_file_and_state_then_resume(deep_model, args, reference, interrupted, tmp_path, caplog):
    """What a kill leaves after block 2's file was renamed into place but before the state that points past
    it, or in the middle of a write: a block file beyond the state (here garbage) and temporary files."""
    caplog.set_level(logging.INFO, logger="gptqlab")
    out = copy_of(interrupted, tmp_path)
    blocks = partial_dir(out) / "blocks"
    (blocks / "block-00002.safetensors").write_bytes(b"not the real block 2")
    (blocks / "block-00003.safetensors.tmp").write_bytes(b"half a block")
    (partial_dir(out) / "state.safetensors.tmp").write_bytes(b"\x00" * 100)

    assert run_cli(["quantize", deep_model, out, *args]) == 0
    assert "continuing at block 2 of 4" in caplog.text
    assert json.loads((out / "quant_report.json").read_text())["resumed_at_block"] == 2
    assert not partial_dir(out).exists()
    assert_identical(out, reference)


def test_killed_while_assembling_resumes_without_requantizing(deep_model, args, reference, interrupted, tmp_path):
    import gptqlab.quantize.run

    out = copy_of(interrupted, tmp_path)

    def killed_half_way(folder, tensors, max_shard_bytes):
        (folder / "shard-00000.tmp").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.run, "write_shards", killed_half_way)
        assert run_cli(["quantize", deep_model, out, *args]) == 130
    assert next_block(out) == LAYERS and (partial_dir(out) / "final").is_dir()

    assert run_cli(["quantize", deep_model, out, *args]) == 0
    assert json.loads((out / "quant_report.json").read_text())["resumed_at_block"] == LAYERS
    assert len(json.loads((out / "quant_report.json").read_text())["layers"]) == 7 * LAYERS
    assert_identical(out, reference)


def test_full_disk_keeps_finished_blocks_and_rerun_resumes(
    deep_model, args, reference, interrupted, tmp_path, monkeypatch, capsys
):
    import errno

    import gptqlab.quantize.progress

    out = copy_of(interrupted, tmp_path)
    real_save = gptqlab.quantize.progress.save_atomic

    def disk_fills_at_block_3(tensors, path, metadata=None):
        if path.name == "block-00003.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(tensors, path, metadata)

    monkeypatch.setattr(gptqlab.quantize.progress, "save_atomic", disk_fills_at_block_3)
    assert run_cli(["quantize", deep_model, out, *args]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptqlab: error: cannot write") and "\n" not in err
    assert "block-00003.safetensors: No space left on device; free disk space" in err
    assert "3 finished blocks are kept" in err and "rerun the same command to resume" in err
    assert listing(partial_dir(out) / "blocks") == [f"block-0000{i}.safetensors" for i in range(3)]

    assert run_cli(["quantize", deep_model, out, *args]) == 0
    assert_identical(out, reference)


def test_other_settings_are_refused_until_no_resume(deep_model, args, interrupted, tmp_path, capsys):
    out = copy_of(interrupted, tmp_path)
    before = {p: (partial_dir(out) / p).stat().st_mtime_ns for p in listing(partial_dir(out))}

    assert run_cli(["quantize", deep_model, out, *args, "--bits", "3", "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run with other settings (the calibration tokens differ; bits 4 → 3; seed 0 → 5)" in err
    assert "pass --no-resume to delete it and start over" in err and "\n" not in err
    assert {p: (partial_dir(out) / p).stat().st_mtime_ns for p in listing(partial_dir(out))} == before

    assert run_cli(["quantize", deep_model, out, *args, "--bits", "3", "--no-resume"]) == 0
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 3
    assert json.loads((out / "quant_report.json").read_text())["resumed_at_block"] == 0
    assert not partial_dir(out).exists()


def test_resume_flag_needs_a_run_in_progress(deep_model, args, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["quantize", deep_model, out, *args, "--resume"]) == 2
    assert f"--resume: there is no run in progress at {partial_dir(out)}" in capsys.readouterr().err
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate_state", "state.safetensors is damaged"),
        ("drop_block", "does not match the block files"),
        ("drop_run_json", "is not a gptqlab run in progress (no run.json)"),
        ("edit_model", "model file model.safetensors changed"),
    ],
)
def test_damaged_progress_is_refused_and_kept(deep_model, args, interrupted, tmp_path, capsys, damage, message):
    out = copy_of(interrupted, tmp_path)
    partial = partial_dir(out)
    if damage == "truncate_state":
        state = partial / "state.safetensors"
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "drop_block":
        (partial / "blocks" / "block-00000.safetensors").unlink()
    elif damage == "drop_run_json":
        (partial / "run.json").unlink()
    else:
        deep_model = shutil.copytree(deep_model, tmp_path / "model")
        os.utime(deep_model / "model.safetensors")  # as if its weights had been rewritten
    kept = listing(partial)
    assert run_cli(["quantize", deep_model, out, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert listing(partial) == kept and not out.exists()


# ---- issue 12: checksums on progress, strays, verify before publishing, --overwrite keeps the old OUT ----


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            "flip a byte in block 0's data",
            "block-00000.safetensors is damaged: its SHA-256 differs from the one recorded",
        ),
        ("truncate block 1", "block-00001.safetensors is damaged: its SHA-256 differs"),
        ("flip a byte in the state's tensors", "state.safetensors is damaged (ValueError: its checksum does not match"),
        ("edit the state's reports", "state.safetensors is damaged (ValueError: its checksum does not match"),
    ],
)
def test_damaged_block_or_state_is_refused_in_one_line(
    deep_model, args, interrupted, tmp_path, capsys, damage, message
):
    out = copy_of(interrupted, tmp_path)
    partial = partial_dir(out)
    if damage.startswith("flip a byte in block"):
        _flip(partial / "blocks" / "block-00000.safetensors", 0.9)
    elif damage.startswith("truncate"):
        block = partial / "blocks" / "block-00001.safetensors"
        block.write_bytes(block.read_bytes()[:-64])
    elif damage.startswith("flip a byte in the state"):
        _flip(partial / "state.safetensors", 0.95)
    else:
        state = partial / "state.safetensors"
        data = state.read_bytes()
        assert data.count(b'\\"loss\\": ') >= 1
        state.write_bytes(data.replace(b'\\"loss\\": ', b'\\"loss\\":-', 1))
    kept = {p: (partial / p).read_bytes() for p in listing(partial) if (partial / p).is_file()}
    assert run_cli(["quantize", deep_model, out, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptqlab: error: ") and "\n" not in err and message in err, err
    assert "pass --no-resume to delete it and start over" in err
    assert not out.exists()
    assert {p: (partial / p).read_bytes() for p in listing(partial) if (partial / p).is_file()} == kept


def test_stray_files_in_progress_are_ignored_and_named(deep_model, args, reference, interrupted, tmp_path, caplog):
    out = copy_of(interrupted, tmp_path)
    partial = partial_dir(out)
    (partial / "notes.txt").write_text("mine")
    (partial / "blocks" / "block-abc.safetensors").write_bytes(b"not a block")
    (partial / "blocks" / "extra").mkdir()
    assert run_cli(["quantize", deep_model, out, *args]) == 0
    assert "ignoring files that gptqlab did not write: blocks/block-abc.safetensors, notes.txt" in caplog.text
    assert_identical(out, reference)


def test_a_checkpoint_that_fails_verify_is_not_published(deep_model, args, interrupted, tmp_path, monkeypatch, capsys):
    """Damage between assembly and publishing (here: a negative scale written into the shard before the
    manifest) is caught by verify's checks; OUT is not created and the finished blocks are kept."""
    from safetensors.torch import load_file, save_file

    import gptqlab.quantize.run

    out = copy_of(interrupted, tmp_path)
    real = gptqlab.quantize.run.write_shards

    def damaged_shards(folder, tensors, max_shard_bytes):
        names = real(folder, tensors, max_shard_bytes)
        state = load_file(folder / "model.safetensors")
        state["model.layers.3.mlp.up_proj.scales"][0, 0] = -1.0
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return names

    monkeypatch.setattr(gptqlab.quantize.run, "write_shards", damaged_shards)
    assert run_cli(["quantize", deep_model, out, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the assembled checkpoint fails verify: model.safetensors: " in err, err
    assert "model.layers.3.mlp.up_proj.scales: 1 of" in err and "nothing was published" in err
    assert not out.exists() and next_block(out) == LAYERS

    monkeypatch.undo()
    assert run_cli(["quantize", deep_model, out, *args]) == 0  # the rerun assembles it again from the blocks


def test_a_block_changed_on_disk_during_the_run_is_not_published(deep_model, args, interrupted, tmp_path, capsys):
    import gptqlab.quantize.progress

    out = copy_of(interrupted, tmp_path)
    real_save = gptqlab.quantize.progress.save_atomic

    def damage_block_2_after_block_3(tensors, path, metadata=None):
        real_save(tensors, path, metadata)
        if path.name == "block-00003.safetensors":
            _flip(path.parent / "block-00002.safetensors", 0.8)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.progress, "save_atomic", damage_block_2_after_block_3)
        assert run_cli(["quantize", deep_model, out, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "block-00002.safetensors changed on disk after it was written; nothing was published" in err, err
    assert not out.exists()


def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_complete(deep_model, args, reference, tmp_path):
    import gptqlab.quantize.progress

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p: (out / p).read_bytes() for p in listing(out)}
    real_save = gptqlab.quantize.progress.save_atomic

    def interrupt_at_block_2(tensors, path, metadata=None):
        if path.name == "block-00002.safetensors":
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gptqlab.quantize.progress, "save_atomic", interrupt_at_block_2)
        assert run_cli(["quantize", deep_model, out, *args, "--bits", "3", "--overwrite"]) == 130
    assert {p: (out / p).read_bytes() for p in listing(out)} == before
    assert run_cli(["quantize", deep_model, out, *args, "--bits", "3", "--overwrite"]) == 0
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
