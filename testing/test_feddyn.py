"""FedDyn (core/strategy/feddyn.py) against a float64 transcription of Acar et al. 2021, Algorithm 1."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from core.config import validate_config
from core.distributed import DistContext, Transport
from core.local_run import StateParts
from core.seeding import client_generator
from core.server import Server
from core.simulation import build_simulation
from core.task import load_task
from core.vectorized import LossCall
from testing.conftest import load_ckpt, run_trainer

ALPHA, LR, STEPS = 0.1, 0.1, 3


def _sim(personalization: dict, weighting: str = "uniform"):
    cfg = validate_config({"model_config": {"model_type": "MLP"}, "strategy": "feddyn",
                           "strategy_config": {"feddyn_alpha": ALPHA, "client_weighting": weighting},
                           "server_config": {"max_iteration": 3, "num_clients_per_iteration": 5},
                           "client_config": {"local_epochs": STEPS, "batch_size": 10_000, "augment": False,
                                             "optimizer_config": {"type": "sgd", "lr": LR}},
                           "data_config": {"num_clients": 20, "partition": "dirichlet", "alpha": 0.5},
                           "personalization": personalization}, "feddyn test")
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(cfg, load_task("synthetic"), None, ctx, Transport(ctx))


def _reference(sim, start: torch.Tensor, rounds: int, with_h: bool = True):
    """Algorithm 1 in float64, from the same initial model, cohorts and full-batch data: per client,
    ``STEPS`` gradient steps on ``L_k(w) - <g_k, w> + alpha/2 ||w - w_t||^2``, then
    ``g_k -= alpha (w_k - w_t)``; ``h -= alpha/m sum_k (w_k - w_t)``; ``w_{t+1} = mean_k w_k - h / alpha``
    (uniform mean), from the (N,) initial state ``start``. Returns the global parameters and every
    client's g_k (lists of tensors in parameter order)."""
    sim.layout.load_(start)
    model = copy.deepcopy(sim.model).double()
    call, names = LossCall(model), [f"model.{n}" for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    h = [torch.zeros_like(p) for p in w]
    g: dict[int, list[torch.Tensor]] = {}
    m = sim.schedule.num_clients
    for r in range(1, rounds + 1):
        trained = []
        for cid in sim.schedule.cohort(r).tolist():
            gen = client_generator(torch.device("cpu"), sim.cfg.seed, r, cid)
            batch = next(iter(sim.trainer.loader.batches(sim.train_clients.get(cid), gen)))
            batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
            gk = g.setdefault(cid, [torch.zeros_like(p) for p in w])
            theta = [p.clone().requires_grad_() for p in w]
            for _ in range(STEPS):
                loss = functional_call(call, dict(zip(names, theta)), (batch,))
                grads = torch.autograd.grad(loss, theta)
                with torch.no_grad():
                    for t, gr, gi, wt in zip(theta, grads, gk, w):
                        t -= LR * (gr - gi + ALPHA * (t - wt))
            theta = [t.detach() for t in theta]
            g[cid] = [gi - ALPHA * (t - wt) for gi, t, wt in zip(gk, theta, w)]
            trained.append(theta)
        mean = [sum(ts) / len(trained) for ts in zip(*trained)]
        if with_h:
            h = [hi - ALPHA / m * sum(t[i] - w[i] for t in trained) for i, hi in enumerate(h)]
        w = [mi - hi / ALPHA for mi, hi in zip(mean, h)] if with_h else mean
    return w, g


def _train(sim, rounds: int, tmp_path) -> Server:
    server = Server(sim, tmp_path, None)
    for r in range(1, rounds + 1):
        server._round(r)
    return server


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_feddyn_matches_a_float64_transcription_of_the_paper(tmp_path):
    """Three rounds of 5 of 20 clients: the global model, the server's h and each trained client's
    g_k agree with Algorithm 1 in float64; leaving h out of the reference misses by far more."""
    sim = _sim({"method": "none"})
    start = sim.layout.flatten().clone()
    server = _train(sim, 3, tmp_path)
    k = sim.layout.num_params
    w, g = _reference(sim, start, 3)
    got = server.global_flat[:k].double()
    error = float((got - _flat(w)).abs().max())
    assert error < 2e-6, f"global model off the float64 reference by {error:.3g}"
    without_h = float((got - _flat(_reference(sim, start, 3, with_h=False)[0])).abs().max())
    assert without_h > 100 * max(error, 1e-7), (without_h, error)
    h = StateParts({"h": k}).views(server.strategy_state)["h"]
    assert float(h.abs().max()) > 1e-3, "h moved"
    for cid, gk in g.items():
        stored = sim.rows.strategy_state(server.store[cid])["gradient"].double()
        assert torch.allclose(stored, _flat(gk), atol=2e-6), cid


def test_feddyn_keeps_personal_layers_out_of_its_state(tmp_path):
    """With FedPer's head, g_k and h are zero on the head and the head's global copy never moves."""
    sim = _sim({"method": "fedper", "local_layers": ["linear"]})
    start = sim.layout.flatten().clone()
    server = _train(sim, 2, tmp_path)
    personal = sim.personal_params
    assert torch.equal(server.global_flat[personal], start[personal])
    assert float(server.strategy_state[personal].abs().max()) == 0.0
    row = sim.rows.strategy_state(server.store[int(sim.schedule.cohort(1)[0])])["gradient"]
    assert float(row[personal].abs().max()) == 0.0 and float(row.abs().max()) > 0.0


def test_feddyn_resumes_exactly(tmp_path):
    """h and every client's g_k come back from the checkpoint: 2 + 2 rounds equal 4."""
    args = ["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", "experiments/synthetic/config.yaml",
            "-task", "synthetic", "--set", "strategy=feddyn", "--set", "server_config.ckpt_freq=2"]
    straight = run_trainer(args + ["-run_name", "straight", "--set", "server_config.max_iteration=4"])
    half = run_trainer(args + ["-run_name", "half", "--set", "server_config.max_iteration=2"])
    resumed = run_trainer(args + ["-run_name", "half", "--set", "server_config.max_iteration=4", "-resume"])
    assert straight.returncode == half.returncode == resumed.returncode == 0, resumed.stderr[-1500:]
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "half")
    assert float(a["strategy_state"].abs().sum()) > 0
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["strategy_state"], b["strategy_state"])
    assert a["client_store"]["entries"].keys() == b["client_store"]["entries"].keys()


@pytest.mark.parametrize("key, value, match", [("feddyn_alpha", 0, "greater than 0"),
                                               ("feddyn_alpha", "true", "number")])
def test_feddyn_alpha_is_checked(key, value, match):
    from core.errors import UserError

    with pytest.raises(UserError, match=match):
        validate_config({"strategy": "feddyn", "strategy_config": {key: True if value == "true" else value}}, "t")
