"""pFedMe (core/personalization/pfedme.py) against a float64 transcription of Dinh et al. 2020,
Algorithm 1, and end to end: personalized evaluation, resume, config checks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from core.config import validate_config
from core.distributed import DistContext, Transport
from core.errors import UserError
from core.seeding import client_generator
from core.server import Server
from core.simulation import build_simulation
from core.task import load_task
from core.vectorized import LossCall
from testing.conftest import load_ckpt, read_metrics, run_trainer

LAMBDA, K, PERSONAL_LR, LR = 15.0, 3, 0.05, 0.05


def _sim():
    cfg = validate_config({"model_config": {"model_type": "MLP"},
                           "server_config": {"max_iteration": 2, "num_clients_per_iteration": 4},
                           "client_config": {"local_epochs": 1, "batch_size": 16, "augment": False,
                                             "optimizer_config": {"type": "sgd", "lr": LR}},
                           "data_config": {"num_clients": 20, "partition": "dirichlet", "alpha": 0.5},
                           "personalization": {"method": "pfedme", "pfedme_lambda": LAMBDA, "pfedme_k": K,
                                               "pfedme_personal_lr": PERSONAL_LR}}, "pfedme test")
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(cfg, load_task("synthetic"), None, ctx, Transport(ctx))


def _reference(sim, start: torch.Tensor, rounds: int, warm: bool = True):
    """Algorithm 1 in float64 from the (N,) initial state ``start``: per client and batch D, K steps
    ``theta -= personal_lr (grad f(theta; D) + lambda (theta - w))`` (theta carried from step to step
    within the round when ``warm``, else restarted from w), then ``w -= lr lambda (w - theta)``;
    the server takes the sample-weighted mean of the clients' w (beta 1). Returns the global
    parameters and the last round's theta per client (flat float64)."""
    sim.layout.load_(start)
    model = copy.deepcopy(sim.model).double()
    call, names = LossCall(model), [f"model.{n}" for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    thetas: dict[int, torch.Tensor] = {}
    for r in range(1, rounds + 1):
        trained, weights = [], []
        for cid in sim.schedule.cohort(r).tolist():
            local = [p.clone() for p in w]
            theta = [p.clone() for p in w]
            gen = client_generator(torch.device("cpu"), sim.cfg.seed, r, cid)
            for batch in sim.trainer.loader.batches(sim.train_clients.get(cid), gen):
                batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
                theta = [t.detach().clone().requires_grad_() for t in (theta if warm else local)]
                for _ in range(K):
                    grads = torch.autograd.grad(functional_call(call, dict(zip(names, theta)), (batch,)), theta)
                    with torch.no_grad():
                        for t, g, l in zip(theta, grads, local):
                            t -= PERSONAL_LR * (g + LAMBDA * (t - l))
                local = [l - LR * LAMBDA * (l - t.detach()) for l, t in zip(local, theta)]
            thetas[cid] = torch.cat([t.detach().reshape(-1) for t in theta])
            trained.append(local)
            weights.append(float(sim.train_clients.sizes[cid]))
        w = [sum(wt * ps[i] for wt, ps in zip(weights, trained)) / sum(weights) for i in range(len(w))]
    return torch.cat([p.reshape(-1) for p in w]), thetas


def test_pfedme_matches_a_float64_transcription_of_the_paper(tmp_path):
    """Two rounds of 4 of 20 clients, several batches each: the global model and each client's stored
    personalized model theta agree with Algorithm 1 in float64; restarting theta at every step
    (instead of carrying it, as the authors' code does) misses by far more."""
    sim = _sim()
    start = sim.layout.flatten().clone()
    server = Server(sim, tmp_path, None)
    for r in (1, 2):
        server._round(r)
    assert sim.trainer.last_steps > 1, "several local steps"
    k = sim.layout.num_params
    w, thetas = _reference(sim, start, 2)
    error = float((server.global_flat[:k].double() - w).abs().max())
    assert error < 1e-5, f"global model off the float64 reference by {error:.3g}"
    cold = float((server.global_flat[:k].double() - _reference(sim, start, 2, warm=False)[0]).abs().max())
    assert cold > 100 * max(error, 1e-7), (cold, error)
    for cid in sim.schedule.cohort(2).tolist():
        stored = sim.rows.model_state(server.store[cid])["model"]
        assert torch.allclose(stored[:k].double(), thetas[cid], atol=1e-5), cid
        assert float((stored[:k] - server.global_flat[:k]).abs().max()) > 1e-3, "theta is not the global model"


def test_pfedme_reports_personalized_accuracy_and_resumes_exactly(tmp_path):
    """End to end on the synthetic task: personalized accuracy (theta) is reported beside the global
    one and differs from it; 2 + 2 rounds resume to the bits of 4."""
    args = ["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", "experiments/synthetic/config.yaml",
            "-task", "synthetic", "--set", "personalization={method: pfedme, pfedme_k: 2}",
            "--set", "server_config.ckpt_freq=2", "--set", "server_config.val_freq=2"]
    straight = run_trainer(args + ["-run_name", "straight", "--set", "server_config.max_iteration=4"])
    half = run_trainer(args + ["-run_name", "half", "--set", "server_config.max_iteration=2"])
    resumed = run_trainer(args + ["-run_name", "half", "--set", "server_config.max_iteration=4", "-resume"])
    assert straight.returncode == half.returncode == resumed.returncode == 0, straight.stderr[-1500:]
    last = read_metrics(tmp_path / "straight")[-1]
    personal, global_ = last["personalized"]["weighted_mean"], last["global_on_personalized_clients"]["weighted_mean"]
    assert last["personalized"]["clients"] > 0 and personal != global_, last
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "half")
    assert torch.equal(a["global"], b["global"])
    for cid, row in a["client_store"]["entries"].items():
        assert torch.equal(row, b["client_store"]["entries"][cid]), cid


@pytest.mark.parametrize("client, match", [({"type": "sgd", "momentum": 0.9}, "momentum 0"),
                                           ({"type": "adam"}, "type sgd")])
def test_pfedme_needs_plain_sgd(client, match):
    with pytest.raises(UserError, match=match):
        validate_config({"personalization": {"method": "pfedme"}, "client_config": {"optimizer_config": client}}, "t")


def test_pfedme_refuses_vectorize_and_local_layers():
    with pytest.raises(UserError, match="chooses its own"):
        validate_config({"personalization": {"method": "pfedme", "local_layers": ["linear"]}}, "t")
    cfg = validate_config({"model_config": {"model_type": "MLP"}, "personalization": {"method": "pfedme"},
                           "client_config": {"vectorize": True, "optimizer_config": {"type": "sgd"}},
                           "data_config": {"num_clients": 20}}, "t")
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(UserError, match="vectorize does not support personalization.method pfedme"):
        build_simulation(cfg, load_task("synthetic"), None, ctx, Transport(ctx))
