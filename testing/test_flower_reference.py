"""pfedsim's server side against Flower's own strategies (issue 23, "How we will know").

``testing/flower_reference/flower_1.42.0.json`` holds what Flower 1.42.0's strategies
(``flwr.server.strategy``) returned from ``aggregate_fit`` on fixed inputs: 3 rounds of 4 clients
whose trained parameters (two float32 arrays, shapes (3, 4) and (5,)) are the strategy's current global
parameters plus fixed deltas of mixed scale (1e-5 to 0.3), with ``num_examples`` 1 to 500. It was
written by ``testing/flower_reference/record.py``, which runs only in a separate environment with
Flower; this test needs no Flower.

Here the same rounds go through pfedsim's own server path, nothing re-implemented: the clients' float32
deltas ``StateLayout.delta_``, the strategy's weights ``cohort_weights`` (``client_weighting: samples``
is Flower's ``num_examples``), their fixed-point sum ``FixedPointSums`` and its decoding
``RoundLayout.reduce_parts``, and ``Server._apply``: the strategy's ``pseudo_gradient``, then the
server optimizer of ``build_server_optimizer`` stepped with it as ``.grad``. pfedsim follows its own
trajectory from the recorded initial parameters; each round's clients are the recorded ones.

Where the formulas are the same (FedAvg, FedAvgM without and with server momentum, FedProx's server
side, which is FedAvg's), pfedsim's global parameters equal Flower's to float32 rounding
(:func:`rounding_allowance`). The adaptive server optimizers are Reddi et al. 2021's Algorithm 2 in
pfedsim (``core.optim.FedOpt``), and Flower's differ from it:

- FedAdagrad and FedYogi: Flower starts ``v`` at 0 (``self.v_t = [np.zeros_like(x) ...]``), pfedsim at
  tau^2 (the paper's ``v_{-1} = tau^2``). Otherwise the same formulas (FedAdagrad: ``v = v + delta^2``,
  Flower's ``beta_1`` fixed at 0, so pfedsim ``betas[0] = 0``; FedYogi: ``v = v - (1 - beta_2) delta^2
  sign(v - delta^2)``; both ``x + eta m / (sqrt(v) + tau)``), so ``FedOpt`` with ``initial_v=0``
  equals Flower to rounding, and the default (v from tau^2) moves the first round's step by exactly
  the formula's amount.
- FedAdam: Flower also starts ``v`` at 0 and bias-corrects the learning rate, with the round counter
  one ahead: ``eta_norm = eta * sqrt(1 - beta_2^(t + 1)) / (1 - beta_1^(t + 1))``, t =
  ``server_round`` (so round 1 already uses t + 1 = 2). ``FedOpt`` with ``initial_v=0`` and its lr
  set to ``eta_norm`` before each round equals Flower to rounding; the default differs by exactly
  the formula's amount in round 1. Issue 23's scalar (x = 0, mean delta 0.03, lr 0.01, betas 0.9 /
  0.99, tau 1e-3): Flower 0.005568 (recorded), the paper and pfedsim 0.007210, torch's Adam 0.009677.
  Flower's FedAdam also returns float64 parameters (``eta_norm`` is a numpy float64), pfedsim float32.

SCAFFOLD and DGA are not in ``flwr.server.strategy`` (SCAFFOLD is a Flower baseline, not a strategy),
so they are not recorded; their float64 transcriptions are in testing/test_algorithms.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from core.client_store import StoreRow
from core.config import validate_config
from core.exact import FixedPointSums
from core.flat import StateLayout
from core.optim import FedOpt, build_server_optimizer
from core.local_run import StateParts
from core.server import Server
from core.strategy import build_strategy
from core.worker import RoundLayout

FLOWER = Path(__file__).resolve().parent / "flower_reference" / "flower_1.42.0.json"
RECORD = json.loads(FLOWER.read_text())
STRATEGIES = RECORD["strategies"]
U = 2.0 ** -24  # unit roundoff of float32


class _Parameters(nn.Module):
    """A model that is just the recorded arrays, in Flower's order."""

    def __init__(self, arrays):
        super().__init__()
        self.arrays = nn.ParameterList([nn.Parameter(torch.tensor(a, dtype=torch.float32)) for a in arrays])


def _flat(arrays) -> torch.Tensor:
    return torch.cat([torch.tensor(a, dtype=torch.float64).reshape(-1) for a in arrays]).float()


def _flat64(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])


def engine(record: dict, strategy: str = "fedavg", strategy_config: dict | None = None,
           optimizer_config: dict | None = None, optimizer=None, before_step=None) -> list[np.ndarray]:
    """pfedsim's global parameters after each recorded round (float64 copies of float32).

    ``strategy`` / ``strategy_config`` / ``optimizer_config`` are config sections as a user writes
    them; ``optimizer`` (a function of the parameter list) replaces ``build_server_optimizer`` for
    the FedOpt settings that no config reaches (``initial_v=0``); ``before_step(round, optimizer)``
    runs before each round's aggregation (FedAdam's per-round lr)."""
    cfg = validate_config({"strategy": strategy, "strategy_config": strategy_config or {},
                           "server_config": {"optimizer_config": optimizer_config or {"type": "sgd", "lr": 1.0}}},
                          "flower reference")
    rounds = record["rounds"]
    layout = StateLayout(_Parameters(rounds[0]["global"]))
    nothing = torch.zeros(0, dtype=torch.long)
    strategy = build_strategy(cfg.strategy, cfg.strategy_config)
    sim = SimpleNamespace(cfg=cfg, strategy=strategy, layout=layout, personal_index=nothing, personal_params=nothing,
                          personal_numel=0, rows=StoreRow(0, StateParts(), StateParts()), schedule=None,
                          train_clients=None)
    global_flat = layout.flatten().clone()
    assert layout.num_params == global_flat.numel()  # no buffers: every entry is stepped by the optimizer
    weights = nn.Parameter(global_flat[:layout.num_params])
    server = SimpleNamespace(sim=sim, global_flat=global_flat, weights=weights, server_parts=StateParts(),
                             strategy_state=torch.zeros(0),
                             optimizer=optimizer([weights]) if optimizer else
                             build_server_optimizer([weights], cfg.server_config.optimizer_config))
    out = []
    for r, round_in in enumerate(rounds, start=1):
        clients = round_in["clients"]
        sim.schedule = SimpleNamespace(cohort_size=lambda _: len(clients), cohort=lambda _: np.arange(len(clients)))
        sim.train_clients = SimpleNamespace(sizes=np.asarray(round_in["num_examples"], dtype=np.int64))
        lay = RoundLayout(sim, r)
        assert lay.exact
        buf = lay.new_reduce_buffer(torch.device("cpu"))
        delta_fixed, state_fixed, _ = lay.exact_parts(buf)
        fixed = FixedPointSums(delta_fixed, state_fixed, lay.k)
        for slot, client in enumerate(clients):
            layout.delta_(fixed.delta, global_flat, _flat(client))
            assert bool(fixed.add_(torch.tensor(True), float(lay.shares[slot])))
        delta_sum, weight_sum = lay.reduce_parts(buf)[:2]
        if before_step is not None:
            before_step(r, server.optimizer)
        Server._apply(server, delta_sum, weight_sum)
        out.append(global_flat.double().numpy().copy())
    return out


def flower(record: dict) -> list[np.ndarray]:
    """Flower's output parameters after each round, flat float64."""
    return [_flat64(r["output"]) for r in record["rounds"]]


def _mean_delta(r: dict) -> np.ndarray:
    """The round's num_examples-weighted mean client parameters minus the global ones, float64."""
    clients = np.stack([_flat64(c) for c in r["clients"]])
    n = np.asarray(r["num_examples"], dtype=np.float64)
    return (n / n.sum()) @ clients - _flat64(r["global"])


def rounding_allowance(record: dict, sensitivity: float = 1.0) -> list[np.ndarray]:
    """Per entry and round, how far two float32 implementations of the same formula may be apart
    (a first-order bound).

    Flower sums the weighted float32 client parameters in float32 (K products and K - 1 additions:
    at most K U of ``sum_i p_i |x_i|``), pfedsim sums the deltas exactly and rounds their mean once,
    then steps (a few U of the result). So the aggregate of round t differs by at most
    ``e_t = (K + 4) U (sum_i p_i |x_i| + |out_t|)``. The server optimizer passes a change of its
    input (this round's, and the carried difference of the global model) on scaled by at most
    ``1 + sensitivity`` (lr / (1 - momentum) for SGD; the adaptive rules: :func:`fedopt_allowance`), and rounds its
    own step (8 U of ``|out_t|``); the allowance adds up over the rounds."""
    out, carried = [], 0.0
    for r in record["rounds"]:
        clients = np.stack([_flat64(c) for c in r["clients"]])
        n = np.asarray(r["num_examples"], dtype=np.float64)
        weighted = (n / n.sum()) @ np.abs(clients)
        result = np.abs(_flat64(r["output"]))
        carried = (carried + (len(n) + 4) * U * (weighted + result)) * (1 + sensitivity) + 8 * U * result
        out.append(carried)
    return out


def moments(record: dict, rule: str, b1: float, b2: float, v0: float = 0.0):
    """(m_t, v_t, delta_t) per round in float64 as the FedOpt formulas build them from the recorded
    rounds (``delta`` = the weighted mean client parameters minus the recorded global; m, v from 0, or
    v from ``v0``)."""
    m = v = None
    out = []
    for r in record["rounds"]:
        d = _mean_delta(r)
        m = (1 - b1) * d if m is None else b1 * m + (1 - b1) * d
        v = np.full_like(d, v0) if v is None else v
        if rule == "adam":
            v = b2 * v + (1 - b2) * d * d
        elif rule == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = v + d * d
        out.append((m.copy(), v.copy(), d))
    return out


def fedopt_allowance(record: dict, rule: str, b1: float, b2: float, lrs: list[float], tau: float):
    """:func:`rounding_allowance` for the adaptive rules, first order, per entry and round.

    The mean delta D_t of the two implementations differs by ``e_D = e_t + e_x`` (this round's
    aggregate, as in :func:`rounding_allowance`, and the global models' difference carried from the
    earlier rounds). That moves ``m`` by ``e_m = b1 e_m + (1 - b1) e_D`` and ``v`` by ``e_v = b2 e_v
    + 2 (1 - b2) |D| e_D`` (adam; yogi: ``e_v + 2 (1 - b2) |D| e_D``; adagrad: ``e_v + 2 |D| e_D``),
    and the step ``lr m / (sqrt(v) + tau)`` by ``lr e_m / (sqrt(v) + tau) + lr |m| e_v / (2 sqrt(v)
    (sqrt(v) + tau)^2)``; each side also rounds its own m, v and step (16 U of the step, 8 U of
    ``|out_t|``). m and v are Flower's (:func:`moments`)."""
    carried = e_m = e_v = 0.0
    out = []
    for (m, v, d), r, lr in zip(moments(record, rule, b1, b2), record["rounds"], lrs):
        clients = np.stack([_flat64(c) for c in r["clients"]])
        n = np.asarray(r["num_examples"], dtype=np.float64)
        result = np.abs(_flat64(r["output"]))
        e_d = (len(n) + 4) * U * ((n / n.sum()) @ np.abs(clients) + result) + carried
        e_m = b1 * e_m + (1 - b1) * e_d
        e_v = (b2 if rule == "adam" else 1.0) * e_v + 2 * (1.0 if rule == "adagrad" else 1 - b2) * np.abs(d) * e_d
        root = np.sqrt(v)
        step = lr * np.abs(m) / (root + tau)
        through_v = np.divide(lr * np.abs(m) * e_v, 2 * root * (root + tau) ** 2, out=np.zeros_like(v),
                              where=root > 0)
        carried = carried + lr * e_m / (root + tau) + through_v + 16 * U * step + 8 * U * result
        out.append(carried)
    return out


def assert_matches(got, expected, allowance, what: str) -> float:
    """Every entry of every round within the allowance; returns the largest share of it used."""
    used = 0.0
    for t, (g, e, a) in enumerate(zip(got, expected, allowance), start=1):
        err = np.abs(g - e)
        assert np.all(err <= a), (f"{what} round {t}: max |pfedsim - Flower| {err.max():.3g} "
                                  f"(allowance there {a[np.argmax(err - a)]:.3g})")
        used = max(used, float((err / a).max()))
    return used


# ---- the same formula: match to float32 rounding -------------------------------------------------

def test_recording_is_flower_1_42_with_float32_inputs():
    assert RECORD["flower_version"].startswith("1.42.")
    assert set(STRATEGIES) >= {"fedavg", "fedavgm_lr", "fedavgm_momentum", "fedprox", "fedadagrad", "fedadam",
                               "fedyogi", "fedadam_scalar"}
    for name, rec in STRATEGIES.items():
        for r in rec["rounds"]:
            for c in r["clients"]:
                flat = _flat64(c)
                assert np.array_equal(flat, flat.astype(np.float32)), f"{name}: clients' parameters are float32"


@pytest.mark.parametrize("name,strategy,strategy_config",
                         [("fedavg", "fedavg", {}), ("fedprox", "fedprox", {"mu": 0.1})])
def test_fedavg_and_fedprox_match_flower(name, strategy, strategy_config):
    """FedAvg (and FedProx, whose server side is FedAvg's; ``mu`` is Flower's ``proximal_mu``): the
    sample-weighted mean of the clients' parameters, i.e. server SGD with lr 1 on minus the weighted
    mean delta."""
    rec = STRATEGIES[name]
    if name == "fedprox":
        assert rec["hyperparameters"]["proximal_mu"] == strategy_config["mu"]
    got = engine(rec, strategy, {**strategy_config, "client_weighting": "samples"})
    assert_matches(got, flower(rec), rounding_allowance(rec), name)
    assert not np.array_equal(got[-1], _flat64(rec["rounds"][0]["global"]))


def test_uniform_weighting_is_not_flowers():
    """Flower weighs by num_examples: pfedsim's ``client_weighting: uniform`` lands elsewhere."""
    rec = STRATEGIES["fedavg"]
    got = engine(rec, "fedavg", {"client_weighting": "uniform"})
    assert np.abs(got[0] - flower(rec)[0]).max() > 1e3 * rounding_allowance(rec)[0].max()


@pytest.mark.parametrize("name", ["fedavgm_lr", "fedavgm_momentum"])
def test_fedavgm_matches_flower(name):
    """FedAvgM: Flower's ``x - server_learning_rate * u`` with ``u = g`` in round 1 and
    ``u = server_momentum * u + g`` later is torch's SGD (momentum buffer = the first gradient, no
    dampening): ``type: sgd, lr: server_learning_rate, momentum: server_momentum``."""
    rec = STRATEGIES[name]
    h = rec["hyperparameters"]
    lr, momentum = h["server_learning_rate"], h["server_momentum"]
    got = engine(rec, optimizer_config={"type": "sgd", "lr": lr, "momentum": momentum})
    sensitivity = lr / (1 - momentum)
    assert_matches(got, flower(rec), rounding_allowance(rec, sensitivity), name)
    no_momentum = engine(rec, optimizer_config={"type": "sgd", "lr": lr})
    if momentum:  # the allowance tells momentum from none from round 2 on
        assert np.abs(no_momentum[1] - flower(rec)[1]).max() > 100 * rounding_allowance(rec, sensitivity)[1].max()


# ---- FedAdagrad, FedAdam, FedYogi: the documented differences ------------------------------------

FEDOPT = {"fedadagrad": "adagrad", "fedadam": "adam", "fedyogi": "yogi"}


def _fedopt(name: str):
    """(record, pfedsim rule, eta, beta_1, beta_2, tau, Flower's lr per round)."""
    rec = STRATEGIES[name]
    h = rec["hyperparameters"]
    rule, eta, b1, b2, tau = FEDOPT.get(name, "adam"), h["eta"], h["beta_1"], h["beta_2"], h["tau"]
    rounds = range(1, len(rec["rounds"]) + 1)
    if rule == "adam":  # Flower's eta_norm, with its round counter one ahead
        lrs = [eta * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) for t in rounds]
    else:
        lrs = [eta for _ in rounds]
    return rec, rule, eta, b1, b2, tau, lrs


def _flowers_settings(rule, eta, b1, b2, tau, lrs):
    """pfedsim's FedOpt with Flower's settings: v from 0 (``initial_v=0``) and, for FedAdam, its lr
    set to Flower's ``eta_norm`` of the round before the step."""
    def optimizer(params):
        return FedOpt(params, lr=eta, rule=rule, betas=(b1, b2), eps=tau, initial_v=0.0)

    def before_step(r, opt):
        opt.param_groups[0]["lr"] = lrs[r - 1]
    return optimizer, before_step


@pytest.mark.parametrize("name", list(FEDOPT))
def test_fedopt_with_v_from_0_and_flowers_lr_matches_flower(name):
    """What separates pfedsim's FedAdagrad, FedAdam and FedYogi from Flower's is only where v
    starts (Flower: 0, pfedsim: tau^2) and FedAdam's learning rate (Flower's ``eta_norm``): pfedsim's
    own ``FedOpt`` with ``initial_v=0`` (and, for FedAdam, lr = ``eta_norm`` each round) gives
    Flower's recorded outputs to float32 rounding, in all three rounds."""
    rec, rule, eta, b1, b2, tau, lrs = _fedopt(name)
    if rule == "adagrad":
        assert b1 == 0.0  # Flower's FedAdagrad fixes beta_1 = 0 (no momentum); pfedsim: betas[0] = 0
    optimizer, before_step = _flowers_settings(rule, eta, b1, b2, tau, lrs)
    got = engine(rec, optimizer=optimizer, before_step=before_step)
    allowance = fedopt_allowance(rec, rule, b1, b2, lrs, tau)
    assert_matches(got, flower(rec), allowance, f"{name} with Flower's settings")


@pytest.mark.parametrize("name", list(FEDOPT))
def test_default_fedopt_differs_from_flower_by_the_formula(name):
    """pfedsim's default (config ``type: adagrad / adam / yogi``, ``server_form: fedopt``: Reddi et al.
    2021 Algorithm 2, v from tau^2, no bias correction) against Flower in round 1, where both start
    from the same parameters x0 and see the same mean delta D (float64 from the recorded clients):

    - pfedsim: ``x0 + eta (1 - beta_1) D / (sqrt(v) + tau)``, v = ``beta_2 tau^2 + (1 - beta_2) D^2``
      (adam), ``tau^2 + D^2`` (adagrad), ``tau^2 - (1 - beta_2) D^2 sign(tau^2 - D^2)`` (yogi);
    - Flower: the same with v from 0 (``(1 - beta_2) D^2``, ``D^2``, ``(1 - beta_2) D^2``) and, for
      FedAdam, eta replaced by ``eta_norm = eta sqrt(1 - beta_2^2) / (1 - beta_1^2)`` (round 1).

    Each side equals its formula to float32 rounding, so their difference is the formulas'
    difference; that difference is far beyond rounding. For FedAdagrad and FedYogi it is more than 3%
    of the step where ``sqrt(c) |D| < 3 tau`` and under 0.5% where ``sqrt(c) |D| > 10 tau`` (c = 1
    for adagrad, 1 - beta_2 for yogi: where v = tau^2 is not small next to c D^2)."""
    rec, rule, eta, b1, b2, tau, lrs = _fedopt(name)
    got = engine(rec, optimizer_config={"type": rule, "lr": eta, "betas": [b1, b2], "eps": tau})
    x0 = _flat64(rec["rounds"][0]["global"])
    (m, v_paper, d), = moments({"rounds": rec["rounds"][:1]}, rule, b1, b2, v0=tau ** 2)
    (_, v_flower, _), = moments({"rounds": rec["rounds"][:1]}, rule, b1, b2)
    paper = x0 + eta * m / (np.sqrt(v_paper) + tau)
    flowers = x0 + lrs[0] * m / (np.sqrt(v_flower) + tau)
    first = {"rounds": rec["rounds"][:1]}
    allowance = fedopt_allowance(first, rule, b1, b2, lrs, tau)[0]
    assert np.all(np.abs(got[0] - paper) <= allowance), "pfedsim's round 1 is Algorithm 2's"
    assert np.all(np.abs(flower(rec)[0] - flowers) <= allowance), "Flower's round 1 is its formula"
    gap = np.abs(paper - flowers)
    assert (gap / allowance).max() > 1e3, "the two formulas are told apart"
    assert (np.abs(got[0] - flower(rec)[0]) / allowance).max() > 1e3
    if rule != "adam":  # v from tau^2 matters where sqrt(c) |D| is near tau or below, little where it is >> tau
        scaled = np.abs(d) * math.sqrt(1.0 if rule == "adagrad" else 1 - b2)
        near, far = scaled < 3 * tau, scaled > 10 * tau
        assert near.any() and far.any()
        relative = gap / np.abs(flowers - x0)
        assert relative[near].min() > 0.03 > 0.005 > relative[far].max()


def test_issue_23_scalar_flower_fedadam_is_0_005568():
    """Issue 23's scalar: x = 0, mean delta 0.03, lr 0.01, betas (0.9, 0.99), tau 1e-3. Flower's
    FedAdam (recorded): eta_norm = 0.01 sqrt(1 - 0.99^2) / (1 - 0.9^2) = 0.0074248, m = 0.003,
    v = 9e-6, step 0.0074248 * 0.003 / (0.003 + 0.001) = 0.005568. The paper (pfedsim's default):
    0.0072103. torch's Adam (``server_form: torch``, pfedsim before issue 23): 0.009677."""
    rec, rule, eta, b1, b2, tau, lrs = _fedopt("fedadam_scalar")
    assert (rec["rounds"][0]["global"], rec["rounds"][0]["clients"]) == ([[0.0]], [[[np.float32(0.03).item()]]])
    flowers = flower(rec)[0][0]
    assert flowers == pytest.approx(0.005568, abs=5e-7)
    optimizer, before_step = _flowers_settings(rule, eta, b1, b2, tau, lrs)
    assert engine(rec, optimizer=optimizer, before_step=before_step)[0][0] == pytest.approx(flowers, rel=16 * U)
    config = {"type": "adam", "lr": eta, "betas": [b1, b2], "eps": tau}
    assert engine(rec, optimizer_config=config)[0][0] == pytest.approx(0.0072103, abs=1e-7)
    assert engine(rec, optimizer_config={**config, "server_form": "torch"})[0][0] == pytest.approx(0.009677, abs=1e-6)
