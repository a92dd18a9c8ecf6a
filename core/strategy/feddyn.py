"""FedDyn: dynamic regularization, a per-client linear term and a server state h."""
from __future__ import annotations

import torch
from pydantic import Field

from core.local_run import LocalRun, RunInputs, StateParts
from core.strategy.fedavg import FedAvg, shared_only


class FedDyn(FedAvg):
    """FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization",
    arXiv:2111.04263), Algorithm 1, with alpha = ``strategy_config.feddyn_alpha``.

    Each client k keeps ``gradient`` g_k (its state in the client store, zero before its first
    round) and minimises, at every local step, ``L_k(w) - <g_k, w> + alpha/2 ||w - w_global||^2``.
    After training to w_k: ``g_k <- g_k - alpha (w_k - w_global)``. The server keeps ``h`` (zero
    before round 1): ``h <- h - alpha/m sum_k (w_k - w_global)`` over the round's cohort, with m
    the total number of clients, and the new global model is the cohort's mean ``w_k`` minus
    ``h / alpha``: here the pseudo-gradient is ``-(mean delta) + h / alpha``, which server SGD with
    lr 1.0 (the default) steps to exactly that model; another server optimizer steps this
    pseudo-gradient instead.

    The mean is sample-weighted by default (``client_weighting: samples``, as FedAvg here) where
    the paper averages the cohort uniformly; ``client_weighting: uniform`` gives the paper's rule.
    With personal layers, g_k, h and the penalty cover the shared parameters only; the penalty
    shapes the client's training run, not the fine-tuning runs of evaluation.
    """

    name = "feddyn"
    summary = "dynamic regularization (alpha) with server state h"
    dp_refusal = "its server state h sums the clients' deltas outside the clipped, noised sum"

    class Options(FedAvg.Options):
        feddyn_alpha: float = Field(0.01, gt=0, description="FedDyn: weight alpha of the dynamic regularizer "
                                                            "(Acar et al. 2021 use 0.1, 0.01 or 0.001)")

    def __init__(self, strategy_config):
        super().__init__(strategy_config)
        self.alpha = strategy_config.feddyn_alpha

    def client_state(self, layout):
        return StateParts({"gradient": layout.num_params})

    def server_state(self, layout):
        return StateParts({"h": layout.num_params})

    def shape_run(self, run: LocalRun, inputs: RunInputs) -> LocalRun:
        if not inputs.shared:
            return run
        shared, alpha = inputs.shared, self.alpha
        anchors, grads = inputs.anchors(), inputs.layout.param_views(inputs.client["gradient"])

        def penalty(params: list) -> torch.Tensor:
            return sum(0.5 * alpha * (params[i] - anchors[i]).pow(2).sum() - (grads[i] * params[i]).sum()
                       for i in shared)
        return run.but(penalty=penalty)

    def new_client_state(self, inputs, trained_params, steps, lr):
        k = inputs.layout.num_params
        new = inputs.client["gradient"] - self.alpha * (trained_params - inputs.global_flat[:k])
        return {"gradient": shared_only(new, inputs)}

    def new_server_state(self, server, change_sum, num_clients):
        return {"h": server["h"] + change_sum["gradient"] / num_clients}  # change = -alpha (w_k - w_global)

    def pseudo_gradient(self, delta_sum, weight_sum, server):
        pseudo = -delta_sum / weight_sum
        k = server["h"].numel()
        pseudo[:k] += server["h"].to(pseudo.dtype) / self.alpha
        return pseudo
