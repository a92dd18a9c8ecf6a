"""Divergence: a client whose update is not finite is left out and counted; a run whose global model
diverges stops with one line, exit 1, and keeps its last finite checkpoints; metrics are strict JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import e2e_trainer
from core.client_store import ClientStore
from core.config import load_config
from core.distributed import DistContext, Transport
from core.flat import StateLayout, keep_rows_if_finite_
from core.schedule import Schedule
from core.simulation import build_simulation, init_model
from core.task import load_task
from core.worker import RoundLayout, train_share
from testing.conftest import REPO, load_ckpt, rank_envs
from utils.metrics_writer import to_json

FAULTY = str(REPO / "testing" / "tasks" / "faulty_task")
SYNTHETIC = "experiments/synthetic/config.yaml"
# PoisonedMLP makes exactly the clients holding a label-0 sample diverge; with two classes per client
# (label_quantity), about a fifth of them.
POISONED = ["--set", "model_config.model_type=PoisonedMLP", "--set", "data_config.partition=label_quantity",
            "--set", "server_config.max_iteration=4", "--set", "server_config.val_freq=2",
            "--set", "server_config.ckpt_freq=2"]


def _strict_records(run_dir) -> list[dict]:
    """metrics.jsonl parsed by a strict reader (NaN / Infinity tokens are refused)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected_dropped(overrides: list[str], rounds: int) -> list[int]:
    """Per round, the cohort clients holding a sample of label 0, from the partition and the cohort
    schedule alone (synthetic train labels are ``index % 10``; no training involved)."""
    cfg = load_config(REPO / SYNTHETIC, [o for o in overrides if o != "--set"])
    data = load_task(FAULTY).dataset_cls("unused", cfg.data_config, split="train", seed=cfg.seed)
    poisoned = {c for c, idx in enumerate(data.split_plan.train) if np.any(np.asarray(idx) % 10 == 0)}
    schedule = Schedule(cfg.server_config, cfg.data_config.num_clients, cfg.seed)
    return [len(poisoned & set(schedule.cohort(r).tolist())) for r in range(1, rounds + 1)]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pfedsim: error: "), err[-2000:]
    return lines[0]


def _finite_checkpoint(run_dir, name: str) -> dict:
    state = load_ckpt(run_dir, name)
    assert torch.isfinite(state["global"]).all(), f"{name}.pt holds a non-finite global model"
    return state


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
def test_non_finite_clients_are_dropped_and_counted(tmp_path, capsys, vectorize):
    overrides = POISONED + ["--set", f"client_config.vectorize={str(vectorize).lower()}"]
    code = e2e_trainer.main(["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", SYNTHETIC,
                             "-task", FAULTY, "-run_name", "r", *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    run_dir = tmp_path / "r"
    records = _strict_records(run_dir)
    expected = _expected_dropped(overrides, 4)
    assert sum(expected) > 0 and all(e < 5 for e in expected), expected  # some dropped, never a whole cohort
    assert [d for r in records for d in r["dropped_clients"]] == expected
    assert all(np.isfinite(r["train_loss"]) for r in records)
    assert f"{expected[0] + expected[1]} non-finite client updates dropped" in out.out
    _finite_checkpoint(run_dir, "best")
    state = _finite_checkpoint(run_dir, "latest")
    # A client dropped whenever it was sampled keeps the personal layers it was sent: the initial ones.
    cfg = load_config(REPO / SYNTHETIC, [o for o in overrides if o != "--set"])
    data = load_task(FAULTY).dataset_cls("unused", cfg.data_config, split="train", seed=cfg.seed)
    schedule = Schedule(cfg.server_config, cfg.data_config.num_clients, cfg.seed)
    sampled = {c for r in range(1, 5) for c in schedule.cohort(r).tolist()}
    poisoned = [c for c in sampled if np.any(np.asarray(data.split_plan.train[c]) % 10 == 0)]
    store = ClientStore()
    store.load_state_dict(state["client_store"])
    initial = StateLayout(init_model(load_task(FAULTY), cfg, torch.device("cpu"))).flatten()
    head = torch.cat([initial[-650:]])  # linear.weight (10 x 64) and linear.bias (10): the last 650 parameters
    assert poisoned
    for c in poisoned:
        assert torch.equal(store.get(c, None)[:650], head), f"client {c}'s stored personal layers changed"
    healthy = sorted(sampled - set(poisoned))
    assert any(not torch.equal(store.get(c, None)[:650], head) for c in healthy)


def test_share_sum_leaves_out_exactly_the_non_finite_clients():
    """The reduce buffer of a share equals, in float64, the weighted sum over the finite clients
    alone, trained one by one outside train_share; the dropped flags mark the others."""
    cfg = load_config(REPO / SYNTHETIC, [o for o in POISONED if o != "--set"] + ["device=cpu"])
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    sim = build_simulation(cfg, load_task(FAULTY), "unused", ctx, Transport(ctx))
    lay, cohort = RoundLayout(sim, 1), sim.schedule.cohort(1)
    global_flat = sim.layout.flatten()
    slots = global_flat[sim.personal_index].repeat(lay.k)
    buf = torch.cat([global_flat, slots, torch.ones(1)])
    out = train_share(sim, 1, buf)
    delta, weight, _, _, _ = lay.reduce_parts(out)
    want, total, flags = torch.zeros(lay.n, dtype=torch.float64), 0.0, []
    for cid in cohort:
        loss = sim.trainer.train(1, int(cid), sim.train_clients.get(cid), global_flat, global_flat[sim.personal_index])
        state = sim.layout.flatten().double()
        finite = bool(torch.isfinite(state).all() and torch.isfinite(loss))
        flags.append(0.0 if finite else 1.0)
        if finite:
            size = float(sim.train_clients.sizes[cid])
            want += size * (state - global_flat.double())
            total += size
    assert 0 < sum(flags) < len(cohort), flags
    assert lay.dropped(out).tolist() == flags
    assert float(weight) == total
    assert torch.isfinite(delta).all()
    gap = (delta.double() - want).abs().max().item()
    assert gap <= 1e-4 * want.abs().max().item(), f"max |share delta - float64 sum of finite clients| = {gap:.3g}"


def test_keep_if_finite_both_ways():
    """A finite state is kept bit for bit; a non-finite one is zeroed, on the host-checked path and
    on the path that never waits for the device."""
    model = torch.nn.Linear(4, 3)
    layout = StateLayout(model)
    for sync_free in (False, True):
        before = layout.flatten()
        assert bool(layout.keep_if_finite_(torch.tensor(0.5), sync_free=sync_free))
        assert torch.equal(layout.flatten(), before)
        with torch.no_grad():
            model.weight[1, 2] = float("inf")
        assert not bool(layout.keep_if_finite_(sync_free=sync_free))
        assert torch.equal(layout.flatten(), torch.zeros(layout.numel))
        with torch.no_grad():
            model.weight.normal_()
        assert not bool(layout.keep_if_finite_(torch.tensor(float("nan")), sync_free=sync_free))
    stack = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [3.0, 4.0]])
    ok = keep_rows_if_finite_(stack, torch.tensor([0.1, 0.2, float("inf")]))
    assert ok.tolist() == [True, False, False]
    assert stack.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("args,needle", [
    (["-task", "synthetic", "--set", "client_config.optimizer_config.lr=1000"],
     "round 1: the updates of all 5 clients of the round were not finite"),
    (["-task", "synthetic", "--set", "strategy=dga", "--set", "client_config.optimizer_config.lr=1000"],
     "round 1: the updates of all 5 clients"),
    (["-task", "synthetic", "--set", "strategy=scaffold", "--set", "client_config.optimizer_config.lr=50"],
     "clients of the round were not finite"),
    (["-task", "synthetic", "--set", "personalization.method=ditto", "--set", "personalization.local_layers=[]",
      "--set", "client_config.optimizer_config.lr=1000"], "clients of the round were not finite"),
    (["-task", FAULTY, "--set", "model_config.model_type=HugeStepMLP", "--set", "server_config.optimizer_config.lr=1e36"],
     "round 1: the global model became non-finite (NaN or inf) after aggregation"),
], ids=["client-lr", "dga", "scaffold", "ditto", "server-step"])
def test_divergence_stops_with_one_line(tmp_path, capsys, args, needle):
    code = e2e_trainer.main(["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", SYNTHETIC,
                             "-run_name", "r", *args])
    line = _one_line(capsys.readouterr().err)
    assert code == 1
    assert needle in line and "lower the learning rates" in line and "no checkpoint was written yet" in line, line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_late_divergence_keeps_the_last_finite_checkpoints(tmp_path, capsys):
    """Server lr 1e4 on the synthetic task: rounds 1-3 finite, in round 4 every client's update leaves
    the exact sum's range (the global model has reached about 7e7 after round 3)."""
    code = e2e_trainer.main(["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", SYNTHETIC,
                             "-task", "synthetic", "-run_name", "r", "--set", "server_config.optimizer_config.lr=1e4",
                             "--set", "server_config.val_freq=1", "--set", "server_config.ckpt_freq=1"])
    line = _one_line(capsys.readouterr().err)
    assert code == 1 and "round 4:" in line and "checkpoints/latest.pt keeps round 3" in line, line
    run_dir = tmp_path / "r"
    assert _finite_checkpoint(run_dir, "latest")["round"] == 3
    _finite_checkpoint(run_dir, "best")
    assert [r["round"] for r in _strict_records(run_dir)] == [1, 2, 3]
    assert "Stopped early" in (run_dir / "summary.md").read_text()


@pytest.mark.timeout(180)
def test_divergence_releases_the_workers(tmp_path):
    """Two processes: the server says why in one line and exits 1; the worker exits 0 at once,
    not after the process-group timeout (300 s here)."""
    args = ["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", SYNTHETIC, "-task", "synthetic",
            "-run_name", "r", "--set", "server_config.optimizer_config.lr=1e10", "--set", "server_config.timeout_s=300"]
    procs = [subprocess.Popen([sys.executable, "e2e_trainer.py", *args], cwd=REPO, stderr=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, text=True, env=env) for env in rank_envs(2)]
    errs = [p.communicate(timeout=150)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 0], errs
    assert "the updates of all" in _one_line(errs[0])
    assert "pfedsim: error" not in errs[1] and "Traceback" not in errs[1], errs[1]


def test_metrics_lines_are_strict_json():
    record = {"round": 3, "train_loss": float("nan"), "x": {"y": float("inf"), "z": [1.0, float("-inf")]}}
    line = to_json(record)
    assert json.loads(line) == {"round": 3, "train_loss": None, "x": {"y": None, "z": [1.0, None]}}
