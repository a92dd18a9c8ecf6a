"""Shared pieces of the benchmarks: synthetic CIFAR-shaped data, building a simulation in-process, timing."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from core.config import load_config
from core.distributed import DistContext, Transport
from core.simulation import build_simulation
from core.task import Task, load_task
from experiments.cv.dataloaders.dataset import CIFAR10Dataset

REPO = Path(__file__).resolve().parent.parent


class SyntheticCIFAR(CIFAR10Dataset):
    """Random uint8 images of CIFAR shape (50,000 train / 10,000 test), balanced labels; no files."""

    @classmethod
    def load_split(cls, data_path, split, data_config):
        n = 50_000 if split == "train" else 10_000
        gen = torch.Generator().manual_seed(0 if split == "train" else 1)
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10


def synthetic_of_size(train: int, test: int = 10_000) -> type:
    """A SyntheticCIFAR variant with ``train`` / ``test`` random images (for scale runs)."""

    class Sized(SyntheticCIFAR):
        @classmethod
        def load_split(cls, data_path, split, data_config):
            n = train if split == "train" else test
            gen = torch.Generator().manual_seed(0 if split == "train" else 1)
            return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10
    return Sized


def task_for(data: str, train_samples: int = 50_000) -> Task:
    """The cv task, with synthetic data of ``train_samples`` images when ``data`` is ``synthetic``."""
    task = load_task("cv")
    if data == "synthetic":
        cls = SyntheticCIFAR if train_samples == 50_000 else synthetic_of_size(train_samples)
        task = Task(task.name, task.folder, task.models, cls, task.dataloader_cls)
    return task


def single_process_simulation(config: str, data: str, device: str, overrides=()):
    """Build a world-size-1 simulation of ``config`` on ``device`` (cpu or cuda)."""
    cfg = load_config(REPO / config, list(overrides) + [f"device={device}"])
    ctx = DistContext(rank=0, world_size=1, device=torch.device(device), backend="gloo")
    return cfg, build_simulation(cfg, task_for(data), data, ctx, Transport(ctx))


def cohort_samples(sim) -> int:
    """Samples the clients of round 1's cohort train on in one round (all their local epochs)."""
    sizes = sim.train_clients.sizes[sim.schedule.cohort(1)]
    return int(sizes.sum()) * sim.cfg.client_config.local_epochs


def round_times(history: list[dict]) -> tuple[list[float], float]:
    """Every round's training seconds from a run's evaluation records (their ``round_s``), and their
    mean leaving out round 1 (warm-up) when there are more rounds."""
    round_s = [s for record in history for s in record["round_s"]]
    steady = round_s[1:] or round_s
    return round_s, sum(steady) / len(steady)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (device synchronised around each)."""
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


class CallClock:
    """Context manager: while open, every call of ``obj.<name>`` is timed, the device synchronised
    before and after it, and ``seconds`` sums their wall seconds. The syncs change what a round
    costs on a GPU, so rounds timed with a clock open are diagnostics, never the benchmark's figures.
    """

    def __init__(self, obj, name: str, device: torch.device):
        self.obj, self.name, self.device, self.seconds = obj, name, device, 0.0

    def __enter__(self) -> "CallClock":
        original = getattr(self.obj, self.name)
        self._own = vars(self.obj).get(self.name)  # an attribute of the object itself, put back on exit

        def clocked(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return result
        setattr(self.obj, self.name, clocked)  # an instance attribute over the class's method
        return self

    def __exit__(self, *exc) -> None:
        if self._own is None:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self._own)


def machine() -> str:
    """A one-line description of the machine the benchmark ran on."""
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "no GPU"
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save(results: dict, path: Path) -> None:
    """Append one JSON result line to ``path`` and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(results)
    with open(path, "a") as handle:
        handle.write(line + "\n")
    print(line)


def median(values: list[float]) -> float:
    return statistics.median(values)


def benchmark_parser(doc: str, name: str, device: str, config: str = "benchmarks/configs/pfl_cnn_50x50.yaml",
                     repeats: int | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --config, --data, --device, --set, --out (and --repeats)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config)
    parser.add_argument("--data", default="synthetic", help="'synthetic' or the folder holding cifar-10-batches-py")
    parser.add_argument("--device", default=device)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"{name}.jsonl"))
    return parser
