"""pfl-research side of the central-DP comparison (issue 25): pfl's CIFAR-10 IID central-DP benchmark
settings, run with pfl's public API on the data, partition and model of pfedsim's side.

The workload is pfedsim's ``benchmarks/configs/pfl_cnn_dp.yaml``: 1,000 IID users of exactly 50 CIFAR-10
train images (pfedsim's partition, seed 0), cohorts of 50, 1 local epoch of batch 10 with SGD lr 0.1, a
central SGD step with lr 1.0 on the mean update, every user weighing the same (pfl's ``WeightByUser``),
PflCNN (the layers of pfl's benchmark ``simple_cnn``; initial weights as pfedsim draws them, see README).

Privacy as the benchmark's ``gaussian_moments_accountant`` mechanism builds it: a
``PLDPrivacyAccountant`` for ``rounds`` compositions at sampling probability
``max(cohort, noise_cohort) / population``, epsilon 2, delta 1e-6, ``noise_scale = cohort /
noise_cohort``; ``GaussianMechanism.from_privacy_accountant`` with clipping bound 0.4, applied
centrally (``CentrallyAppliedPrivacyMechanism``: each user's update clipped, noise of std
``z * noise_scale * 0.4`` added once to the sum). The population is 1e6, the value the benchmark's
``train.py`` passes (its ``--population`` flag, default 1e7, is not read there); ``PFL_DP_POPULATION``
changes it.

Users are drawn as the benchmark draws them: pfl's ``'random'`` user sampler (uniform, with
replacement, from NumPy's global generator, seeded 0), a fixed cohort of 50 per central iteration.

Environment: ``PFL_DP_ROUNDS`` (default 200) central iterations, ``PFL_DP_EVAL_EVERY`` (default 50)
test-set evaluations, ``PFL_DP_POPULATION`` (default 1e6), ``FW_TAG`` as in the other scripts.
Run pinned: taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python run_pfl_dp.py
Ends with one JSON line, also appended to benchmarks/results/dp_pfl.jsonl.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fw_common as W  # noqa: E402

os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")

ROUNDS = int(os.environ.get("PFL_DP_ROUNDS", "200"))
EVAL_EVERY = int(os.environ.get("PFL_DP_EVAL_EVERY", "50"))
POPULATION = float(os.environ.get("PFL_DP_POPULATION", "1e6"))
LOCAL_LR = 0.1
CENTRAL_LR = 1.0
CLIP = 0.4
EPSILON = 2.0
DELTA = 1e-6
NOISE_COHORT = 1000
RESULTS = W.REPO / "benchmarks" / "results" / "dp_pfl.jsonl"


class Net(torch.nn.Module):
    """PflCNN with the ``loss``/``metrics`` methods pfl's PyTorchModel calls."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def loss(self, x, y, eval=False):  # noqa: A002 - pfl's keyword
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        from pfl.metrics import Weighted
        self.eval() if eval else self.train()
        logits = self(x)
        return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), len(y)),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), len(y))}


def accountant(rounds: int, population: float, noise: float | None = None):
    """pfl's PLD accountant with the benchmark's settings: calibrates the noise multiplier for
    epsilon 2 when ``noise`` is None, else computes the epsilon of ``noise`` at delta 1e-6."""
    from pfl.privacy import PLDPrivacyAccountant
    q = max(W.COHORT, NOISE_COHORT) / population
    if noise is None:
        return PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=q, mechanism="gaussian",
                                    epsilon=EPSILON, delta=DELTA, noise_scale=W.COHORT / NOISE_COHORT)
    return PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=q, mechanism="gaussian",
                                noise_parameter=noise, delta=DELTA, noise_scale=W.COHORT / NOISE_COHORT)


def user_data():
    """(user id -> that user's PyTorchTensorDataset, normalised test images, test labels), from the
    partition and normalisation the other framework scripts use (fw_common)."""
    from pfl.data.pytorch import PyTorchTensorDataset
    x, y, tx, ty = W.load_raw()
    images = W.normalise(x)
    per_user = [(images[idx], y[idx]) for idx in W.partition(y)]
    return (lambda uid: PyTorchTensorDataset(tensors=per_user[uid], user_id=uid)), W.normalise(tx), ty


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    W.seed_all()

    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    t0 = time.perf_counter()
    t = time.perf_counter()
    acct = accountant(ROUNDS, POPULATION)
    calibrate_s = time.perf_counter() - t
    mechanism = GaussianMechanism.from_privacy_accountant(accountant=acct, clipping_bound=CLIP)
    z = float(acct.noise_parameter)
    eps = float(accountant(ROUNDS, POPULATION, noise=z).epsilon)  # the epsilon pfl computes for that z
    print(f"pfl PLD: noise multiplier {z:.6f} for {ROUNDS} rounds (q={max(W.COHORT, NOISE_COHORT) / POPULATION:g}); "
          f"epsilon at it {eps:.6f}; noise std on the sum {mechanism.relative_noise_stddev * CLIP:.6g} "
          f"(calibration {calibrate_s:.1f} s)", flush=True)

    make_dataset_fn, test_x, test_y = user_data()
    np.random.seed(W.SEED)  # pfl's 'random' sampler draws from NumPy's global generator
    fed_train = FederatedDataset(make_dataset_fn, get_user_sampler("random", list(range(W.NUM_CLIENTS))))
    net = Net(W.make_model())
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=CENTRAL_LR))
    backend = SimulatedBackend(training_data=fed_train, val_data=None,
                               postprocessors=[WeightByUser(), CentrallyAppliedPrivacyMechanism(mechanism)])
    algo_params = NNAlgorithmParams(central_num_iterations=ROUNDS, evaluation_frequency=ROUNDS + 1,
                                    train_cohort_size=W.COHORT, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_learning_rate=LOCAL_LR, local_num_epochs=W.LOCAL_EPOCHS,
                                      local_batch_size=W.BATCH_SIZE)
    eval_params = NNEvalHyperParams(local_batch_size=W.EVAL_BATCH)
    t_data = time.perf_counter() - t0

    class Progress(TrainingProcessCallback):
        """Stamps each central iteration and evaluates on the test set every EVAL_EVERY and at the end
        (evaluation time kept apart from the round times)."""

        def __init__(self):
            self.t_begin, self.ends, self.evals, self.eval_s, self.final_eval_s = None, [], [], 0.0, 0.0

        def on_train_begin(self, *, model):
            self.t_begin = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.ends.append(time.perf_counter())
            done = central_iteration + 1
            if done % EVAL_EVERY == 0 or done == ROUNDS:
                t = time.perf_counter()
                acc = W.test_accuracy(model.pytorch_model, test_x, test_y)
                if done < ROUNDS:  # the last one runs after the last stamp
                    self.eval_s += time.perf_counter() - t
                else:
                    self.final_eval_s = time.perf_counter() - t
                self.evals.append({"round": done, "test_acc": round(acc, 4)})
                print(f"round {done}: test acc {acc:.4f}, {time.perf_counter() - self.t_begin:.0f} s", flush=True)
            return False, Metrics()

    progress = Progress()
    FederatedAveraging().run(algorithm_params=algo_params, backend=backend, model=model,
                             model_train_params=train_params, model_eval_params=eval_params,
                             callbacks=[progress])
    if len(progress.ends) != ROUNDS:
        raise SystemExit(f"pfl ran {len(progress.ends)} central iterations, expected {ROUNDS}")
    ends = progress.ends
    round_s = [ends[0] - progress.t_begin] + [b - a for a, b in zip(ends, ends[1:])]
    train_s = sum(round_s) - progress.eval_s  # the evaluations before the last round ran inside the stamps
    result = {
        "framework": "pfl", "version": f"pfl {pfl.__version__}, torch {torch.__version__}",
        "python": platform.python_version(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "tag": os.environ.get("FW_TAG"),
        "rounds": ROUNDS, "cohort": W.COHORT, "cohort_sampling": "fixed 50, pfl 'random' sampler (with replacement)",
        "clients": W.NUM_CLIENTS, "samples_per_client": W.SAMPLES_PER_CLIENT,
        "local_lr": LOCAL_LR, "central_lr": CENTRAL_LR, "batch": W.BATCH_SIZE, "local_epochs": W.LOCAL_EPOCHS,
        "weighting": "WeightByUser", "model": "PflCNN (pfedsim init)",
        "privacy": {"accountant": "pfl PLDPrivacyAccountant", "target_epsilon": EPSILON, "delta": DELTA,
                    "clip": CLIP, "noise_cohort_size": NOISE_COHORT, "population": POPULATION,
                    "sampling_rate": max(W.COHORT, NOISE_COHORT) / POPULATION,
                    "noise_multiplier": z, "epsilon": eps,
                    "noise_std_sum": mechanism.relative_noise_stddev * CLIP, "calibrate_s": round(calibrate_s, 2)},
        "final_test_acc": progress.evals[-1]["test_acc"], "evals": progress.evals,
        "train_s": round(train_s, 2), "s_per_round": round(train_s / ROUNDS, 3),
        "s_per_round_2_on": round((ends[-1] - ends[0] - progress.eval_s) / max(ROUNDS - 1, 1), 3),
        "eval_s": round(progress.eval_s + progress.final_eval_s, 2), "data_prep_s": round(t_data, 2),
        "process_wall_s": round(time.perf_counter() - T_PROCESS, 2),
        "timing": "s_per_round: on_train_begin to the end of the last central iteration, test-set evaluations "
                  "taken out; includes pfl's own evaluation of the round-0 cohort",
    }
    line = json.dumps(result)
    if os.environ.get("PFL_DP_RECORD", "1") == "1":
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
