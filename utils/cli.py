"""What the command-line entry points share: argparse whose mistakes are one line, and output folders
whose creation fails with one line."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from core.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``pfedsim: error:`` line (exit status 2), as every other mistake."""

    def error(self, message: str):
        self.exit(2, f"pfedsim: error: {message} ({self.prog} -h lists the arguments)\n")


def make_folder(path: str | Path, what: str) -> Path:
    """Create folder ``path`` (and its parents) if missing; returns it as a Path.

    Raises:
        UserError: naming ``what`` (the flag it came from, e.g. ``-out``) when it cannot be created
            or written: a file in the way, no permission, a read-only filesystem.
    """
    path = Path(path)
    check_writable(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what}: cannot create the folder {path} ({exc.strerror or type(exc).__name__}); "
                        f"pass a writable folder") from None
    return path


def check_writable(path: str | Path, what: str) -> None:
    """Check, creating nothing, that folder ``path`` exists and can be written, or can be created:
    its nearest existing ancestor is a folder this process may write into.

    Raises:
        UserError: naming ``what`` and the folder that stands in the way.
    """
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what}: cannot create the folder {path} ({existing} is a file); pass a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write into {existing} (permission denied); pass a writable folder")
