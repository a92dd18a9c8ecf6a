"""Flower side of the framework comparison: the shared workload on Flower's simulation engine (Ray).

Legacy-compatible Flower API: a NumPyClient per virtual SuperNode (1,000 nodes, node partition-id i
holds pfedsim's IID client i), flwr.server.strategy.FedAvg sampling 50 clients a round, 20 rounds,
run with flwr.simulation.run_simulation, each virtual client given 1 CPU (Ray started with 1 CPU).

Timing: from the strategy's configure_fit of round 1 to the end of aggregate_fit of round 20.
run_simulation starts the ServerApp thread and the Ray backend together, so the ServerApp begins
round 1 while Ray and its actor are still starting: round 1 includes that start-up (round_s and
s_per_round_2_20 show it). Data loading and the final test-set evaluation are outside wall_s.
Run pinned: taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python run_flower.py
FW_PRECISION=bf16 trains under bfloat16 autocast and FW_CHANNELS_LAST=1 keeps the model and inputs
in channels_last (what pfedsim's client_config.precision=bf16 and channels_last=true do;
FW_BF16_CL=1 sets both).
FW_DEVICE=cuda trains and evaluates on the GPU (each client's batches are moved there, as a Flower
user's client does); FW_ACTORS=N then starts N Ray actors sharing the GPU (num_gpus 1/N each, Ray
given N CPUs), 1 by default.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fw_common as W  # noqa: E402

CACHE = Path(os.environ.get("FW_CACHE", "/tmp/fw_cache"))
DEVICE = os.environ.get("FW_DEVICE", "cpu")
ACTORS = int(os.environ.get("FW_ACTORS", "1"))

# ---- client side (runs in the Ray actor process) ------------------------------------------------
def get_weights(model):
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, arrays):
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)}, strict=True)


from flwr.client import NumPyClient  # noqa: E402


class CifarClient(NumPyClient):
    def __init__(self, cid: int):
        self.cid = cid

    def fit(self, parameters, config):
        st = W.ClientCache.get(CACHE, DEVICE)  # loaded once per actor (fw_common is pickled by reference)
        model = st["model"]
        set_weights(model, parameters)
        idx = st["parts"][self.cid]
        x = W.normalise(torch.from_numpy(np.ascontiguousarray(st["x"][idx])).to(DEVICE))
        y = torch.from_numpy(np.ascontiguousarray(st["y"][idx])).to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=W.LOCAL_LR)
        model.train()
        gen = torch.Generator().manual_seed(int(config.get("server_round", 0)) * 100003 + self.cid)
        for _ in range(W.LOCAL_EPOCHS):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), W.BATCH_SIZE):
                b = order[i:i + W.BATCH_SIZE].to(DEVICE)
                opt.zero_grad(set_to_none=True)
                with W.autocast(DEVICE):
                    loss = torch.nn.functional.cross_entropy(model(W.to_layout(x[b])), y[b])
                loss.backward()
                opt.step()
        return get_weights(model), len(y), {"actor_inits": W.ClientCache.inits, "cache_calls": W.ClientCache.calls}


def client_fn(context):
    return CifarClient(int(context.node_config["partition-id"])).to_client()


# ---- server side --------------------------------------------------------------------------------
from flwr.server.strategy import FedAvg  # noqa: E402


class TimedFedAvg(FedAvg):
    """FedAvg that stamps the start of round 1 and the end of each aggregation."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.t_start = None
        self.t_round_end: list[float] = []
        self.actor_inits = 0  # the most loads any one actor made: 1 when its client cache persists
        self.cache_calls = 0  # the most client calls one load served: all of an actor's calls when it persists

    def configure_fit(self, server_round, parameters, client_manager):
        if server_round == 1 and self.t_start is None:
            self.t_start = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} client failures: {failures[:1]}")
        self.actor_inits = max([self.actor_inits] + [int(res.metrics.get("actor_inits", 0)) for _, res in results])
        self.cache_calls = max([self.cache_calls] + [int(res.metrics.get("cache_calls", 0)) for _, res in results])
        out = super().aggregate_fit(server_round, results, failures)
        self.t_round_end.append(time.perf_counter())
        return out


def main() -> None:
    W.seed_all()
    import flwr
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    # one-time data preparation (outside all timings reported as wall_s)
    t0 = time.perf_counter()
    x, y, tx, ty = W.load_raw()
    parts = np.stack(W.partition(y))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(CACHE / "train_x.npy", x.numpy())
    np.save(CACHE / "train_y.npy", y.numpy())
    np.save(CACHE / "parts.npy", parts)
    test_x, test_y = W.normalise(tx.to(DEVICE)), ty.to(DEVICE)
    init = get_weights(W.make_model())  # pfedsim's initial global weights (fw_common.make_model)
    eval_model = W.make_model().to(DEVICE)
    t_data = time.perf_counter() - t0

    final = {}

    def evaluate_fn(server_round, parameters, config):
        if server_round != W.ROUNDS:
            return None
        set_weights(eval_model, parameters)
        t = time.perf_counter()
        acc = W.test_accuracy(eval_model, test_x, test_y)
        final.update(acc=acc, eval_s=time.perf_counter() - t)
        return 0.0, {"accuracy": acc}

    strategy = TimedFedAvg(
        fraction_fit=W.COHORT / W.NUM_CLIENTS, min_fit_clients=W.COHORT, min_available_clients=W.NUM_CLIENTS,
        fraction_evaluate=0.0, min_evaluate_clients=0,
        initial_parameters=ndarrays_to_parameters(init), evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda rnd: {"server_round": rnd},
    )

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=W.ROUNDS))

    gpu = DEVICE.startswith("cuda")
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 1.0 / ACTORS if gpu else 0.0},
                      "init_args": {"num_cpus": ACTORS, "num_gpus": 1 if gpu else 0, "logging_level": "error",
                                    "log_to_driver": False}}
    t_sim = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=W.NUM_CLIENTS, backend_config=backend_config)
    t_sim_end = time.perf_counter()

    if strategy.t_start is None or len(strategy.t_round_end) != W.ROUNDS or "acc" not in final:
        raise SystemExit(f"simulation did not complete {W.ROUNDS} rounds "
                         f"({len(strategy.t_round_end)} aggregated, final eval {'acc' in final})")
    ends = strategy.t_round_end
    wall = ends[-1] - strategy.t_start
    per_round = [ends[0] - strategy.t_start] + [b - a for a, b in zip(ends, ends[1:])]
    W.report({
        "framework": "flower", "version": f"flwr {flwr.__version__}, ray {__import__('ray').__version__}",
        **W.switches(), "device": DEVICE, "actors": ACTORS, "data": W.DATA_PATH,
        "rounds": W.ROUNDS, "wall_s": round(wall, 2), "s_per_round": round(wall / W.ROUNDS, 3),
        "final_test_acc": round(final["acc"], 4), "actor_inits": strategy.actor_inits,
        "cache_calls": strategy.cache_calls,
        "included": "from FedAvg.configure_fit of round 1 to the end of aggregate_fit of round 20: client "
                    "sampling, parameter (de)serialisation and transport to/from the Ray actor, local "
                    "training, aggregation; round 1 also includes Ray/actor start-up, which "
                    "run_simulation overlaps with the ServerApp's first round. Excludes data loading/"
                    "caching and the final test-set evaluation",
        "s_per_round_2_20": round((ends[-1] - ends[0]) / (W.ROUNDS - 1), 3),
        "round_s": [round(v, 3) for v in per_round],
        "data_prep_s": round(t_data, 2),
        "startup_before_round1_s": round(strategy.t_start - t_sim, 2),
        "after_round20_s": round(t_sim_end - ends[-1], 2),
        "final_eval_s": round(final["eval_s"], 2),
        "run_simulation_total_s": round(t_sim_end - t_sim, 2),
        "process_wall_s": round(time.perf_counter() - T_PROCESS, 2),
    })


if __name__ == "__main__":
    main()
