"""Atomic checkpoint files: written to a temporary name, flushed, then renamed into place."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from core.config import RESUME_MAY_CHANGE, config_difference, with_defaults
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # large client stores stay paged
    except Exception as exc:  # pickle, zip or mmap errors: not a file torch.save wrote
        raise UserError(f"checkpoint {path} is not a pfedsim checkpoint ({type(exc).__name__}); pass -resume "
                        f"with a run folder or its checkpoints/latest.pt") from None
    if not isinstance(state, dict) or "global" not in state:
        raise UserError(f"checkpoint {path} is not a pfedsim checkpoint")
    return state


def check_resumable(path: str | Path, cfg) -> None:
    """Refuse to resume from checkpoint ``path`` with a config that changes what the run computes
    (keys outside :data:`core.config.RESUME_MAY_CHANGE`, e.g. the strategy or the partition).

    Raises:
        UserError: a missing or unreadable checkpoint, or the first differing key.
    """
    stored = load_checkpoint(path).get("config")
    if stored is None:  # not written by the checkpoints of this version's server: nothing to compare
        return
    difference = config_difference(with_defaults(stored), cfg.to_dict(), RESUME_MAY_CHANGE)
    if difference:
        raise UserError(f"-resume {path}: the config differs from the checkpoint's ({difference}); resume with the "
                        f"run's config (only server_config.max_iteration, val_freq, ckpt_freq, logging and "
                        f"compute switches may change) or start another -run_name")
