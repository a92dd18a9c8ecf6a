"""One run at a time in a run folder: an exclusive OS lock held for the life of the run."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from core.errors import UserError
from utils.cli import make_folder

LOCK_NAME = "run.lock"


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/run.lock``, taken before anything is written there.

    The operating system releases the lock when the holding process exits, however it exits (even
    ``kill -9``), so a lock left by a crashed run is never stale: the next run simply takes it. The
    file holds the holder's host and pid, for the message a second run gets. Use it as a context
    manager, or call :meth:`acquire` and :meth:`release`.

    Raises:
        UserError: from :meth:`acquire`, when another live process holds the folder's lock, or the
            folder cannot be created.
    """

    def __init__(self, run_dir: str | Path, what: str = "-outputPath"):
        self.run_dir = Path(run_dir)
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock made, deepest first

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def acquire(self) -> "RunLock":
        """Take the lock (creating the run folder if missing); refuse if another run holds it."""
        missing = self.run_dir.absolute()
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)
            missing = missing.parent
        make_folder(self.run_dir, self.what)
        self._new_file = not self.path.exists()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise UserError(f"run folder {self.run_dir} is in use by another run ({holder}); wait for it to "
                                f"finish, or choose another -run_name") from None
            if _same_file(fd, self.path):  # not a file a finishing run unlinked after we opened it
                break
            os.close(fd)
        self._fd = fd
        try:  # who holds it, for the message a second run gets (a full disk only loses that)
            holder = f"host {socket.gethostname()}, pid {os.getpid()}\n".encode()
            os.pwrite(fd, holder, 0)  # over the last holder's line, never an empty file in between
            os.ftruncate(fd, len(holder))
        except OSError:
            pass
        return self

    def release(self, discard: bool = False) -> None:
        """Let the lock go. ``discard``: the run wrote nothing (it stopped at a start check), so the
        lock file goes too (if this lock made it), and the folders this lock created (the run folder, -outputPath) if they
        are empty."""
        if self._fd is None:
            return
        if discard:
            if self._new_file:  # a lock file left by an earlier run of the folder stays
                self.path.unlink(missing_ok=True)
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else is there, leave it
                    break
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int, wait_s: float = 2.0) -> str:
    """The holder line of a lock file held by another run. A holder that has just taken the lock of a
    new file writes its line a moment later, so an empty file is read again for up to ``wait_s``
    seconds before the holder is called unknown."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            line = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            return "holder unknown"
        if line or time.monotonic() >= deadline:
            return line or "holder unknown"
        time.sleep(0.02)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
