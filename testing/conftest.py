"""Shared fixtures: the real CIFAR-10 copy, and helpers that run e2e_trainer.py as a user would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from utils.sweep import launcher

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PFEDSIM_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))
SHAKESPEARE = Path(os.environ.get("PFEDSIM_SHAKESPEARE", REPO.parent / "shared" / "data" / "shakespeare"))

# A small federated CIFAR-10 job: 500 clients of about 100 samples, 4 per round, SmallCNN, FedPer.
SMALL_CV = {
    "model_config": {"model_type": "SmallCNN"},
    "server_config": {"max_iteration": 4, "num_clients_per_iteration": 4, "val_freq": 2, "ckpt_freq": 2,
                      "eval_batch_size": 500},
    "client_config": {"local_epochs": 1, "batch_size": 20,
                      "optimizer_config": {"type": "sgd", "lr": 0.05, "momentum": 0.9}},
    "data_config": {"num_clients": 500, "partition": "dirichlet", "alpha": 0.3, "download": False},
    "personalization": {"method": "fedper", "local_layers": ["linear"]},
    "seed": 3,
    "device": "cpu",
}


def write_config(folder: Path, config: dict, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def run_trainer(args: list[str], nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run e2e_trainer.py (under torch.distributed.run when nproc > 1) from the repo root."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return subprocess.run(launcher(nproc) + ["e2e_trainer.py"] + args, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous started right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_envs(world_size: int) -> list[dict]:
    """The environment of each rank of a launch by hand (as mpiexec would): a loopback rendezvous on
    a free port, one thread per process, no progress bars."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return [dict(env, RANK=str(r), LOCAL_RANK=str(r)) for r in range(world_size)]


def failure_text(proc: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: its rank-tagged error lines first, then the end of stderr."""
    lines = proc.stderr.splitlines()
    marked = [l for l in lines if "error" in l.lower() or "terminate" in l or "abort" in l.lower()]
    return "\n".join(marked[:40]) + "\n...\n" + proc.stderr[-3000:]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_ckpt(run_dir: Path, name: str = "latest") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="session")
def cifar_path() -> Path:
    if not (DATA / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.fail(f"real CIFAR-10 expected at {DATA} (set PFEDSIM_CIFAR10 to its folder)")
    return DATA


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The folder holding tiny Shakespeare's input.txt (../shared/data/shakespeare beside the repo)."""
    if not (SHAKESPEARE / "input.txt").is_file():
        pytest.fail(f"tiny Shakespeare's input.txt expected in {SHAKESPEARE} (set PFEDSIM_SHAKESPEARE to its folder)")
    return SHAKESPEARE
