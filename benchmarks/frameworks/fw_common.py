"""The workload shared by the framework comparison scripts (run_flower.py, run_pfl.py).

Everything here is built from pfedsim's own pieces so that the three frameworks see the same data,
partition and model: pfedsim's CIFAR-10 reader, its IID partitioner (seed 0) and its PflCNN.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments.cv.dataloaders.dataloader import MEAN, STD  # noqa: E402  (same normalisation as pfedsim)

DATA_PATH = os.environ.get("FW_DATA", "/work/shared/data/cifar10")
HERE = Path(__file__).resolve().parent

# The workload (identical to benchmarks/configs/pfl_cnn_50x50.yaml)
NUM_CLIENTS = 1000
SAMPLES_PER_CLIENT = 50
COHORT = 50
ROUNDS = 20
LOCAL_EPOCHS = 1
BATCH_SIZE = 10
LOCAL_LR = 0.05
SEED = 0
EVAL_BATCH = 1000

# Speed switches, the counterparts of pfedsim's client_config.precision and channels_last:
# FW_PRECISION=bf16 trains under bfloat16 autocast, FW_CHANNELS_LAST=1 keeps the model and the
# training inputs in channels_last; FW_BF16_CL=1 sets both (the name used by the first runs).
BF16 = os.environ.get("FW_PRECISION", "fp32") == "bf16" or os.environ.get("FW_BF16_CL") == "1"
CHANNELS_LAST = os.environ.get("FW_CHANNELS_LAST") == "1" or os.environ.get("FW_BF16_CL") == "1"


def seed_all() -> None:
    """Seed every RNG the scripts use with SEED and pin torch to one thread."""
    import random

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)


def normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x_uint8.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x_uint8.device).view(1, 3, 1, 1) * 255
    return (x_uint8.float() - mean) / std


def to_layout(t: torch.Tensor) -> torch.Tensor:
    """A model or an NCHW input batch in the memory format chosen by FW_CHANNELS_LAST."""
    return t.to(memory_format=torch.channels_last) if CHANNELS_LAST else t


def autocast(device: str):
    """The training-step context chosen by FW_PRECISION (bf16 autocast, or a no-op for fp32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=BF16)


def switches() -> dict:
    """The speed switches of this run, for the result record."""
    return {"precision": "bf16" if BF16 else "fp32", "channels_last": CHANNELS_LAST}


def load_raw():
    """(train_x uint8, train_y int64, test_x uint8, test_y int64) via pfedsim's reader, or with
    ``FW_DATA=synthetic`` the random CIFAR-shaped images of ``benchmarks.common.SyntheticCIFAR``
    (the data pfedsim's GPU benchmarks use; for timing only, its accuracy means nothing)."""
    if DATA_PATH == "synthetic":
        from benchmarks.common import SyntheticCIFAR
        return (*SyntheticCIFAR.load_split(None, "train", None), *SyntheticCIFAR.load_split(None, "test", None))
    from experiments.cv.dataloaders.cifar10 import read_batches
    x, y = read_batches(DATA_PATH, "train", download=False)
    tx, ty = read_batches(DATA_PATH, "test", download=False)
    return x, y, tx, ty


def partition(train_y: torch.Tensor) -> list[np.ndarray]:
    from core.partition import iid
    parts = iid(train_y.numpy(), NUM_CLIENTS, seed=SEED)
    assert all(len(p) == SAMPLES_PER_CLIENT for p in parts)
    return parts


def make_model() -> torch.nn.Module:
    """A PflCNN; its initial weights are drawn as pfedsim draws its global model's (``core.simulation.init_model``:
    ``torch.manual_seed(derive_seed(seed, 0x5EED))``), so the three frameworks start from the same weights. The
    global torch RNG is left where that seed puts it."""
    from core.config import ModelSection
    from experiments.cv.model import PflCNN
    from core.seeding import derive_seed
    torch.manual_seed(derive_seed(SEED, 0x5EED))
    return PflCNN(ModelSection(model_type="PflCNN"))


class ClientCache:
    """What a client process (a Flower Ray actor) loads once: the memory-mapped uint8 train images and
    labels, the partition, and one model that every client call reuses. It lives in this importable module
    so that cloudpickle pickles it by reference: a cache defined in the ``__main__`` script would be pickled
    by value with the client function Flower ships with every message, and rebuilt at every client call.
    ``inits`` counts the loads in this process and ``calls`` the calls that one load served: a cache that
    persists serves every client call of its actor (``calls`` > 1), one pickled by value serves one."""

    _state: dict = {}
    inits = 0
    calls = 0

    @classmethod
    def get(cls, cache_dir: Path, device: str) -> dict:
        cls.calls += 1
        if not cls._state:
            torch.set_num_threads(1)
            cls._state = {"x": np.load(cache_dir / "train_x.npy", mmap_mode="r"),
                          "y": np.load(cache_dir / "train_y.npy", mmap_mode="r"),
                          "parts": np.load(cache_dir / "parts.npy"),
                          "model": to_layout(make_model().to(device))}
            cls.inits += 1
        return cls._state


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Accuracy of ``model`` on the full test set (``test_x`` already normalised)."""
    model.eval()
    correct = 0
    for i in range(0, len(test_y), EVAL_BATCH):
        correct += int((model(test_x[i:i + EVAL_BATCH]).argmax(1) == test_y[i:i + EVAL_BATCH]).sum())
    return correct / len(test_y)


def report(result: dict) -> None:
    """Print the final JSON line and write results_<framework>.json next to this file
    (results_<framework>_<FW_TAG>.json when the environment sets FW_TAG)."""
    line = json.dumps(result)
    tag = os.environ.get("FW_TAG")
    name = f"results_{result['framework']}{'_' + tag if tag else ''}.json"
    (HERE / name).write_text(json.dumps(result, indent=1) + "\n")
    print(line, flush=True)


def now() -> float:
    return time.perf_counter()
