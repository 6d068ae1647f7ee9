"""publish(): OUT is replaced only by a complete checkpoint, and a failed swap puts the old one back."""

from __future__ import annotations

import os

import pytest

from gptqlab.checkpoint import write


def _folder(path, text):
    path.mkdir()
    (path / "model.safetensors").write_text(text)
    return path


def test_overwrite_replaces_and_removes_the_old_copy(tmp_path):
    out = _folder(tmp_path / "out", "old")
    write.publish(_folder(tmp_path / "staging", "new"), out, overwrite=True)
    assert (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    staging = _folder(tmp_path / "staging", "new")
    real_replace = os.replace

    def fail_on_staging(src, dst):
        if str(src) == str(staging):
            raise OSError(28, "No space left on device", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(write.os, "replace", fail_on_staging)
    with pytest.raises(OSError):
        write.publish(staging, out, overwrite=True)
    assert (out / "model.safetensors").read_text() == "old"
    assert not (tmp_path / ".out.old").exists()
