"""Two ``gptqlab quantize`` runs on one OUT: the second is refused while the first runs, a killed run's lock
does not outlive it, and a finished run leaves no lock file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testkit import run_cli

from gptqlab.calib.sources import builtin_texts
from gptqlab.quantize.lock import lock_path
from gptqlab.quantize.progress import partial_dir
from gptqlab.quantize.run import SLOW_BLOCK_ENV


def test_a_second_run_on_the_same_out_is_refused_until_the_first_is_gone(tiny_models, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(builtin_texts("peoples-daily")[:20]), encoding="utf-8")
    out = tmp_path / "out"
    args = ["--nsamples", "4", "--seqlen", "32", "--group-size", "32", "-q", "--calib", f"txt:{calib}"]
    cmd = [sys.executable, "-m", "gptqlab.cli", "quantize", str(tiny_models["llama"]), str(out), *args]
    first = subprocess.Popen(
        cmd, env={**os.environ, SLOW_BLOCK_ENV: "30"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (partial_dir(out) / "run.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None and lock_path(out).exists()

        assert run_cli(["quantize", tiny_models["llama"], out, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"gptqlab: error: another gptqlab quantize is writing {out} (process {first.pid}); wait for it to "
            f"finish, or choose another OUT (its lock is {lock_path(out)})"
        )
        assert partial_dir(out).is_dir()  # the refused run touched nothing of the first run's progress
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # SIGKILL leaves the lock file, but the kernel dropped the lock: the rerun takes it and resumes.
    assert lock_path(out).exists()
    assert run_cli(["quantize", tiny_models["llama"], out, *args]) == 0
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["calib.txt", "out"]
