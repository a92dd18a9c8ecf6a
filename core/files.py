"""Writing run files so that a full disk costs one line and leaves no partial file behind."""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from core.errors import RunStopped

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(RunStopped):
    """A run file could not be written: no space left on its device (or the quota is spent).
    Exit status 1; the message names the folder, the file and the bytes it needed."""

    exit_code = 1


def free_bytes(folder: Path) -> int:
    """Bytes free for this user on the device of ``folder`` (its nearest existing ancestor)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _disk_was_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a full-disk OSError or was raised while handling one: torch.save's zip
    writer, closing after the OSError, raises its own RuntimeError ("unexpected pos ...") whose
    context is the OSError, depending on where in the file the disk filled."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@contextmanager
def disk_guard(target: str | Path, needed, partial: str | Path | None = None):
    """Turn a full-disk ``OSError`` raised inside the block (or an error raised while handling one)
    into :class:`DiskFull`, after removing the ``partial`` file the block was writing (if any).
    Other errors pass through unchanged.

    Args:
        target: the file being written (named in the message).
        needed: how many bytes writing it takes (named in the message): an int, or a function
            returning it, called only when the disk is full.
    """
    target = Path(target)
    try:
        yield
    except Exception as exc:
        if not _disk_was_full(exc):
            raise
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        size = needed() if callable(needed) else needed
        raise DiskFull(f"no space left on the device of {target.parent} while writing {target.name} ({size:,} "
                       f"bytes needed, {free_bytes(target.parent):,} free); free space there, then "
                       f"continue the run with -resume (or start it with another -outputPath)") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place: a reader, or a crash
    or full disk half-way, sees the old content or the new one, never a part.

    Raises:
        DiskFull: no space for the file (the temporary file is removed; ``path`` is untouched).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode()
    with disk_guard(path, len(data), tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def append_line(path: str | Path, line: str) -> None:
    """Append one ``line`` (with its newline) to ``path`` whole or not at all: on a full disk the
    file is cut back to its previous length, so no half line is left.

    Raises:
        DiskFull: no space for the line.
    """
    path = Path(path)
    data = memoryview((line + "\n").encode())
    with open(path, "ab", buffering=0) as handle:  # unbuffered: nothing is left to fail at close
        size = handle.seek(0, os.SEEK_END)
        try:
            with disk_guard(path, len(data)):
                while data:
                    data = data[handle.write(data):]
        except DiskFull:
            handle.truncate(size)
            raise


class _Counter:
    """A write-only sink that counts the bytes written to it."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def saved_size(obj) -> int:
    """Bytes ``torch.save(obj)`` writes (serialized into a counter, nothing kept in memory)."""
    import torch

    counter = _Counter()
    torch.save(obj, counter)  # type: ignore[arg-type]  # a writable file-like object, as torch.save accepts
    return counter.size
