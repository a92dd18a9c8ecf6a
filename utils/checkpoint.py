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
        raise UserError(f"checkpoint {path} is not a pfedsim checkpoint, or is cut short ({type(exc).__name__}); "
                        f"use another checkpoint of the run (checkpoints/latest.pt or best.pt)") from None
    if not isinstance(state, dict) or "global" not in state:
        raise UserError(f"checkpoint {path} is not a pfedsim checkpoint")
    return state


def check_resumable(path: str | Path, cfg, state_numel: int) -> None:
    """Refuse to resume from checkpoint ``path`` when it cannot continue this run: a config that
    changes what the run computes (keys outside :data:`core.config.RESUME_MAY_CHANGE`, e.g. the
    strategy or the partition), a model of another size than ``state_numel`` (parameters and
    buffers, the flat global state), or a ``server_config.max_iteration`` below its round.

    Raises:
        UserError: a missing or unreadable checkpoint, or the first reason it cannot continue.
    """
    state = load_checkpoint(path)
    stored = state.get("config")
    if stored is not None:  # None: written before checkpoints held their config; nothing to compare
        difference = config_difference(with_defaults(stored), cfg.to_dict(), RESUME_MAY_CHANGE)
        if difference:
            raise UserError(f"-resume {path}: the config differs from the checkpoint's ({difference}); resume with "
                            f"the run's config (only server_config.max_iteration, val_freq, ckpt_freq, logging and "
                            f"compute switches may change) or start another -run_name")
    if state["global"].numel() != state_numel:
        raise UserError(f"-resume {path}: its global model holds {state['global'].numel()} values, this config's "
                        f"model {state_numel}; resume with the run's model_config or start another -run_name")
    if state.get("round", 0) > cfg.server_config.max_iteration:
        raise UserError(f"-resume {path}: the checkpoint is at round {state['round']}, past "
                        f"server_config.max_iteration {cfg.server_config.max_iteration}; set max_iteration to at least "
                        f"{state['round']} to continue the run")
