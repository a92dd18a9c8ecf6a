"""Atomic checkpoint files: written to a temporary name, flushed, then renamed into place."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from core.errors import UserError


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves either the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU.

    Raises:
        UserError: when the file does not exist or is not a pfedsim checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass -resume with a run folder or a .pt file")
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # large client stores stay paged
    if not isinstance(state, dict) or "global" not in state:
        raise UserError(f"checkpoint {path} is not a pfedsim checkpoint")
    return state
