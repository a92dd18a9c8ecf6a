"""pfl-research side of the framework comparison: the shared workload with pfl's PyTorch backend.

pfl's FederatedDataset (user id -> PyTorchTensorDataset of that user's 50 normalised images and
labels, built from pfedsim's IID partition), SimulatedBackend, PyTorchModel with a local SGD
optimizer (lr 0.05) and a central SGD optimizer with lr 1.0 (plain FedAvg), FederatedAveraging,
20 central iterations of 50 users, 1 local epoch, batch 10.

Timing: a callback stamps on_train_begin and the end of each central iteration; wall_s is from
the first to the end of iteration 20 (before any other callback). Data loading and model set-up
are outside it; the final test-set evaluation runs after algorithm.run returns.
Run pinned: taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python run_pfl.py
FW_PRECISION=bf16 and FW_CHANNELS_LAST=1 switch the local training steps as in run_flower.py.
FW_DEVICE (default cpu) is the device pfl trains on (PFL_PYTORCH_DEVICE, unless that is set).
Several processes: taskset -c 0,1 env OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone
--nproc_per_node=2 run_pfl.py (pfl then joins the gloo group itself and splits each cohort across the
processes; every process draws the same cohorts from CohortSampler, seeded alike).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fw_common as W  # noqa: E402

DEVICE = os.environ.get("FW_DEVICE", "cpu")
os.environ.setdefault("PFL_PYTORCH_DEVICE", DEVICE)  # pfl would take CUDA whenever one is present


class PflWrapped(torch.nn.Module):
    """PflCNN plus the ``loss``/``metrics`` methods pfl's PyTorchModel calls."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(W.to_layout(x))

    def loss(self, x, y, eval=False):  # noqa: A002 - pfl's keyword
        self.eval() if eval else self.train()
        with contextlib.nullcontext() if eval else W.autocast(x.device.type):
            return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        from pfl.metrics import Weighted
        self.eval() if eval else self.train()
        logits = self(x)
        n = len(y)
        return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), n),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}


class CohortSampler:
    """pfl user sampler (callable() -> user id): each run of ``cohort`` calls returns distinct users
    (sampled without replacement, like pfedsim and Flower), fresh draw per cohort."""

    def __init__(self, num_users: int, cohort: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.num_users, self.cohort, self.queue = num_users, cohort, []

    def __call__(self):
        if not self.queue:
            self.queue = list(self.rng.choice(self.num_users, self.cohort, replace=False))
        return int(self.queue.pop())


def main() -> None:
    W.seed_all()

    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.pytorch import PyTorchTensorDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    t0 = time.perf_counter()
    x, y, tx, ty = W.load_raw()
    parts = W.partition(y)
    train_x = W.normalise(x)
    test_x, test_y = W.normalise(tx), ty
    users = {u: (train_x[idx], y[idx]) for u, idx in enumerate(parts)}

    def make_dataset_fn(user_id):
        ux, uy = users[user_id]
        return PyTorchTensorDataset(tensors=(ux, uy), user_id=user_id)

    fed_train = FederatedDataset(make_dataset_fn, CohortSampler(W.NUM_CLIENTS, W.COHORT, W.SEED))
    net = PflWrapped(W.to_layout(W.make_model()))  # same seeded init as the other scripts
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=fed_train, val_data=None, postprocessors=[])
    algo_params = NNAlgorithmParams(central_num_iterations=W.ROUNDS, evaluation_frequency=W.ROUNDS,
                                    train_cohort_size=W.COHORT, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_learning_rate=W.LOCAL_LR, local_num_epochs=W.LOCAL_EPOCHS,
                                      local_batch_size=W.BATCH_SIZE)
    eval_params = NNEvalHyperParams(local_batch_size=W.EVAL_BATCH)
    t_data = time.perf_counter() - t0

    class Stamps(TrainingProcessCallback):
        def __init__(self):
            self.t_begin, self.ends = None, []

        def on_train_begin(self, *, model):
            self.t_begin = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.ends.append(time.perf_counter())
            return False, Metrics()

    stamps = Stamps()
    t_run = time.perf_counter()
    FederatedAveraging().run(algorithm_params=algo_params, backend=backend, model=model,
                             model_train_params=train_params, model_eval_params=eval_params,
                             callbacks=[stamps])
    t_run_end = time.perf_counter()
    if len(stamps.ends) != W.ROUNDS:
        raise SystemExit(f"pfl ran {len(stamps.ends)} central iterations, expected {W.ROUNDS}")
    t = time.perf_counter()
    device = next(model.pytorch_model.parameters()).device
    acc = W.test_accuracy(model.pytorch_model, test_x.to(device), test_y.to(device))
    eval_s = time.perf_counter() - t

    ends = stamps.ends
    wall = ends[-1] - stamps.t_begin
    per_round = [ends[0] - stamps.t_begin] + [b - a for a, b in zip(ends, ends[1:])]
    distributed = torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return  # under torchrun every rank trains its share of the cohort; rank 0 reports
    W.report({
        "framework": "pfl", "processes": torch.distributed.get_world_size() if distributed else 1,
        "version": f"pfl {pfl.__version__ if hasattr(pfl, '__version__') else '?'}",
        **W.switches(), "device": str(device),
        "rounds": W.ROUNDS, "wall_s": round(wall, 2), "s_per_round": round(wall / W.ROUNDS, 3),
        "final_test_acc": round(acc, 4),
        "included": "from the on_train_begin callback to the end of central iteration 20 (inside "
                    "FederatedAveraging.run): user sampling, building each user's dataset, local "
                    "training, model-difference statistics, aggregation and the central update; "
                    "also pfl's built-in before/after-training evaluation of the 50 users in "
                    "iteration 0 (pfl always evaluates at iteration 0). Excludes data loading/"
                    "normalisation, model set-up and the final test-set evaluation",
        "s_per_round_2_20": round((ends[-1] - ends[0]) / (W.ROUNDS - 1), 3),
        "round_s": [round(v, 3) for v in per_round],
        "data_prep_s": round(t_data, 2),
        "run_call_s": round(t_run_end - t_run, 2),
        "final_eval_s": round(eval_s, 2),
        "process_wall_s": round(time.perf_counter() - T_PROCESS, 2),
    })


if __name__ == "__main__":
    main()
