"""Record Flower's server-side aggregation on fixed inputs, for testing/test_flower_reference.py.

Runs only in a separate virtual environment that has Flower (never in CI; pfedsim does not depend on
Flower)::

    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install "flwr==1.42.*"
    /tmp/flwr-venv/bin/python testing/flower_reference/record.py

It writes ``testing/flower_reference/flower_<version>.json`` next to this file. Each strategy of
``flwr.server.strategy`` (FedAvg, FedAvgM with and without server momentum, FedProx, FedAdagrad,
FedAdam, FedYogi) is driven through ``aggregate_fit`` for ``ROUNDS`` rounds: in round r every one of
``CLIENTS`` clients returns the strategy's current global parameters plus a fixed delta (float32),
with a fixed ``num_examples``; the deltas and counts are drawn once from ``SEED`` and shared by all
strategies, so only the global parameters the clients start from differ between strategies (each
follows its own trajectory, as a real run would). Per round the file holds the global parameters the
clients started from, every client's returned parameters and ``num_examples``, and Flower's output
parameters, all as float64 lists (exact copies of the float32 values).

One more record, ``fedadam_scalar``, is issue 23's scalar: x = 0, one client whose mean delta is
0.03, eta 0.01, betas (0.9, 0.99), tau 1e-3, one round.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import flwr
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

SEED = 20260423
ROUNDS = 3
CLIENTS = 4
SHAPES = [(3, 4), (5,)]

WEIGHTING = ("Flower weights each client by its FitRes.num_examples: FedAvg, FedProx and the FedOpt family "
             "(FedAdagrad, FedAdam, FedYogi, through FedAvg.aggregate_fit) with aggregate_inplace (float32 "
             "parameters times float64 num_examples / total, summed in float32), FedAvgM with aggregate (float32 "
             "parameters times the integer num_examples, summed and divided by the total in float32).")

# name -> (class, keyword arguments, server-side formula in Flower 1.42's terms)
STRATEGIES = {
    "fedavg": (FedAvg, {}, "x_{t+1} = sum_i n_i x_i / sum_i n_i"),
    "fedavgm_lr": (FedAvgM, {"server_learning_rate": 0.5, "server_momentum": 0.0},
                   "g = x_t - fedavg; x_{t+1} = x_t - server_learning_rate * g"),
    "fedavgm_momentum": (FedAvgM, {"server_learning_rate": 0.7, "server_momentum": 0.9},
                         "g = x_t - fedavg; u = g (round 1), u = server_momentum * u + g (later); "
                         "x_{t+1} = x_t - server_learning_rate * u"),
    "fedprox": (FedProx, {"proximal_mu": 0.1}, "as FedAvg (proximal_mu is sent to the clients only)"),
    "fedadagrad": (FedAdagrad, {"eta": 0.01, "eta_l": 0.1, "tau": 1e-3},
                   "delta = fedavg - x_t; m = beta_1 m + (1 - beta_1) delta (beta_1 = 0); v = v + delta^2 "
                   "(m, v from 0); x_{t+1} = x_t + eta m / (sqrt(v) + tau)"),
    "fedadam": (FedAdam, {"eta": 0.01, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
                "delta = fedavg - x_t; m = beta_1 m + (1 - beta_1) delta; v = beta_2 v + (1 - beta_2) delta^2 "
                "(m, v from 0); eta_norm = eta sqrt(1 - beta_2^(t + 1)) / (1 - beta_1^(t + 1)) with t the "
                "server_round; x_{t+1} = x_t + eta_norm m / (sqrt(v) + tau)"),
    "fedyogi": (FedYogi, {"eta": 0.01, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
                "delta = fedavg - x_t; m = beta_1 m + (1 - beta_1) delta; "
                "v = v - (1 - beta_2) delta^2 sign(v - delta^2) (m, v from 0); "
                "x_{t+1} = x_t + eta m / (sqrt(v) + tau)"),
}
HYPER = ("eta", "eta_l", "beta_1", "beta_2", "tau", "server_learning_rate", "server_momentum", "proximal_mu")


def inputs(seed: int = SEED):
    """Initial parameters (float32; N(0, 1) with exact zeros) and, per round, each client's delta
    (float32: both signs, each entry's magnitude 10^U(-5, -0.5), some exact zeros, plus a drift common
    to the round's clients) and num_examples (1 to 500)."""
    gen = np.random.default_rng(seed)
    initial = [gen.normal(0.0, 1.0, s).astype(np.float32) for s in SHAPES]
    initial[0][0, 0] = initial[1][2] = 0.0
    rounds = []
    for r in range(ROUNDS):
        drift = [gen.normal(0.0, 1.0, s) * 10.0 ** gen.uniform(-4, -1, s) for s in SHAPES]
        deltas = []
        for i in range(CLIENTS):
            client = [(d + gen.normal(0.0, 1.0, s) * 10.0 ** gen.uniform(-5, -0.5, s)).astype(np.float32)
                      for d, s in zip(drift, SHAPES)]
            client[1][(r + i) % SHAPES[1][0]] = 0.0
            deltas.append(client)
        rounds.append({"num_examples": [int(n) for n in gen.integers(1, 501, CLIENTS)], "deltas": deltas})
    return initial, rounds


def as_lists(arrays) -> list:
    return [np.asarray(a, dtype=np.float64).tolist() for a in arrays]


def fit_res(params, num_examples: int) -> FitRes:
    return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(params),
                  num_examples=num_examples, metrics={})


def drive(cls, options: dict, initial, rounds) -> list[dict]:
    """``aggregate_fit`` for each round on clients that start from the strategy's current global."""
    strategy = cls(initial_parameters=ndarrays_to_parameters(initial), **options)
    current = [a.copy() for a in initial]
    out = []
    for r, round_in in enumerate(rounds, start=1):
        clients = [[(g + d).astype(np.float32) for g, d in zip(current, delta)] for delta in round_in["deltas"]]
        assert all(a.dtype == np.float32 for c in clients for a in c)
        results = [(None, fit_res(c, n)) for c, n in zip(clients, round_in["num_examples"])]
        parameters, _ = strategy.aggregate_fit(r, results, [])
        new = parameters_to_ndarrays(parameters)
        assert [a.shape for a in new] == [a.shape for a in current], "Flower changed the shapes"
        out.append({"server_round": r, "global": as_lists(current), "clients": [as_lists(c) for c in clients],
                    "num_examples": list(round_in["num_examples"]), "output": as_lists(new),
                    "output_dtype": [str(a.dtype) for a in new]})
        current = [np.asarray(a) for a in new]
    return out


def main() -> None:
    initial, rounds = inputs()
    record = {
        "flower_version": flwr.__version__, "numpy_version": np.__version__, "python": platform.python_version(),
        "recorded_by": "testing/flower_reference/record.py", "seed": SEED, "rounds": ROUNDS, "clients": CLIENTS,
        "shapes": [list(s) for s in SHAPES], "weighting": WEIGHTING,
        "note": "Each round's clients return the strategy's current global parameters plus fixed float32 deltas; "
                "'global' is what they started from, 'output' what aggregate_fit returned. Values are float32 "
                "written as float64.",
        "strategies": {},
    }
    for name, (cls, options, formula) in STRATEGIES.items():
        strategy = cls(initial_parameters=ndarrays_to_parameters(initial), **options)
        hyper = {k: getattr(strategy, k) for k in HYPER if hasattr(strategy, k)}
        record["strategies"][name] = {"class": f"flwr.server.strategy.{cls.__name__}", "hyperparameters": hyper,
                                      "formula": formula, "rounds": drive(cls, options, initial, rounds)}
    scalar = [np.zeros(1, np.float32)]
    options = {"eta": 0.01, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    one = [{"num_examples": [1], "deltas": [[np.full(1, 0.03, np.float32)]]}]
    record["strategies"]["fedadam_scalar"] = {
        "class": "flwr.server.strategy.FedAdam", "hyperparameters": options,
        "formula": STRATEGIES["fedadam"][2] + " (issue 23's scalar: x = 0, one client, mean delta 0.03)",
        "rounds": drive(FedAdam, options, scalar, one)}
    path = Path(__file__).resolve().parent / f"flower_{flwr.__version__}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} (Flower {flwr.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
