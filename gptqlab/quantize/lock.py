"""A lock on OUT, so that two ``gptqlab quantize`` runs never write the same checkpoint or progress folder.

The lock is ``fcntl.flock`` on ``.OUT.lock`` beside OUT (the kernel drops it when the process dies, so a
killed run never leaves a stale lock). The file holds the owner's process id, for the message that a second
run prints, and is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from gptqlab.errors import GptqlabError


def lock_path(out: Path) -> Path:
    """The lock file of a run that writes ``out``."""
    return out.parent / f".{out.name}.lock"


def _owner(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def locked(out: Path) -> Iterator[Path]:
    """Hold the lock on ``out`` for the duration of the ``with`` block; yields the lock file's path.

    Raises GptqlabError when another process holds it, or OSError when the lock file cannot be created (the
    caller turns that into a message about OUT's folder).
    """
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never truncate a link's target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise GptqlabError(
                    f"another gptqlab quantize is writing {out}{_owner(path)}; wait for it to finish, or choose "
                    f"another OUT (its lock is {path})"
                ) from None
            raise
        # The holder before us may have removed the file after we opened it; then our lock guards nothing.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        # Remove before unlocking: a run waiting on this inode then sees it is gone and retries.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
