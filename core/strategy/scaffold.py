"""SCAFFOLD: control variates that correct every local step for client drift."""
from __future__ import annotations

from core.local_run import LocalRun, RunInputs, StateParts
from core.strategy.fedavg import FedAvg, shared_only


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020, arXiv:1910.06378), control variates of option II.

    Every local step is corrected by ``c - c_i`` (server control minus the client's control, kept
    per client in the client store as its ``control`` state, zero before a client's first round):
    after the optimizer step, ``y -= lr * (c - c_i)``. With plain SGD this is the paper's corrected
    gradient step; with momentum the correction stays outside the momentum buffer (as in Flower's
    niid_bench baseline), since inside it the controls, estimated as ``(x - y) / (K lr)``, would be
    amplified round after round. After K local steps with learning rate lr:
    ``c_i+ = c_i - c + (x - y) / (K lr)``; the server sets ``c += sum(c_i+ - c_i) / num_clients``.

    With personal layers the controls cover the shared parameters only (``c_i+`` is zeroed at
    personal positions, so ``c`` and the corrections are zero there too): a personal layer is
    never averaged, so there is no drift from a global model to correct, and its start ``x`` is the
    client's own copy. K counts the steps that trained the shared parameters (FedRep's body
    epochs, not its head epochs). SCAFFOLD needs an SGD client optimizer (config check).

    The model update weighs clients by their train samples by default (``client_weighting:
    samples``, as FedAvg here), where the paper's Algorithm 1 averages the cohort's deltas
    uniformly; ``strategy_config.client_weighting: uniform`` gives the paper's rule. The controls'
    update is the paper's in either case: ``c`` moves by the plain sum of changes over the total
    number of clients N.
    """

    name = "scaffold"
    summary = "control variates against client drift"
    dp_refusal = "its control variates are per-client state sent to the server unclipped and un-noised"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.client_config.optimizer_config.type != "sgd":
            raise ValueError("strategy scaffold estimates its controls as (x - y) / (K lr), an SGD step; "
                             "set client_config.optimizer_config.type: sgd or choose another strategy")

    def client_state(self, layout):
        return StateParts({"control": layout.num_params})

    def server_state(self, layout):
        return StateParts({"control": layout.num_params})

    def shape_run(self, run: LocalRun, inputs: RunInputs) -> LocalRun:
        return run.but(correction=inputs.layout.param_views(inputs.server["control"] - inputs.client["control"]))

    def new_client_state(self, inputs, trained_params, steps, lr):
        k = inputs.layout.num_params
        new = (inputs.client["control"] - inputs.server["control"]
               + (inputs.global_flat[:k] - trained_params) / (max(steps, 1) * lr))
        return {"control": shared_only(new, inputs)}

    def new_server_state(self, server, change_sum, num_clients):
        return {"control": server["control"] + change_sum["control"] / num_clients}
