"""FedAvg: the base strategy every other one refines (client weights, pseudo-gradient, hooks)."""
from __future__ import annotations

from typing import Literal, Mapping

import numpy as np
import torch
from pydantic import Field

from core.distributed import host_to_device
from core.local_run import LocalRun, RunInputs, StateParts
from core.sections import Section


class FedAvg:
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629).

    Each client's delta (local model minus global model) is weighted by its number of train
    samples (``client_weighting: samples``) or equally (``uniform``); the pseudo-gradient is minus
    the weighted mean delta. Stepped by a server SGD with lr 1.0 this is exactly FedAvg; server SGD
    with momentum is FedAvgM (Hsu et al. 2019, arXiv:1909.06335); Adam / Yogi / Adagrad give
    FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, arXiv:2003.00295), stepped as the paper's
    Algorithm 2 (:class:`core.optim.FedOpt`): momentum ``m`` from 0 (FedAdagrad too, with
    ``b1 = betas[0]``), ``v`` from tau^2, no bias correction, ``eps`` as the paper's tau, and the
    paper's betas (0.9, 0.99) and tau 1e-3 unless the config sets them. ``server_form: torch``
    steps torch's Adam and Adagrad instead (``v`` from 0; Adam bias-corrects ``m`` and ``v``
    before adding ``eps``; Adagrad has no momentum); FedYogi is the same in both forms.

    A strategy is one module: its options (:class:`Options`, merged into ``strategy_config``), its
    config check (:meth:`check`), its named state (:meth:`client_state`, :meth:`server_state`) and
    its hooks, which receive named views (:class:`RunInputs`).
    """

    name = "fedavg"
    summary = "sample-weighted mean of the deltas"
    relative_weights = False  # True: weights are exp(log_weight), meaningful only up to a common factor
    # True: the weights are known before training (cohort_weights), so the workers sum the clients'
    # terms in fixed point, the same bit for bit however the cohort is split (core/exact.py);
    # False: float32 sums, which depend on the split and order at the level of float rounding
    exact_sum = True
    dp_refusal: str | None = None  # why central DP (privacy.mechanism gaussian) cannot run it; None: it can

    class Options(Section):
        client_weighting: Literal["samples", "uniform"] = Field("samples", description="client weight in the average")

    def __init__(self, strategy_config):
        self.weighting = strategy_config.client_weighting

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse a whole config (:class:`core.config.Config`) this strategy cannot run, with a
        ValueError that names the fields and the fix (nothing to refuse here)."""

    def cohort_weights(self, num_samples) -> np.ndarray:
        """(K,) float64 weights of a cohort's clients before training, from their (K,) train sample
        counts: the counts (``client_weighting: samples``) or 1 (``uniform``), as :meth:`client_weight`.
        Every rank computes the same values, so each client's share ``w_i / sum(w)`` of the
        fixed-point sum is known up front."""
        counts = np.asarray(num_samples, dtype=np.float64)
        return counts if self.weighting == "samples" else np.ones_like(counts)

    def client_weight(self, num_samples, train_loss: torch.Tensor):
        """Weight of clients in the aggregate: their train sample counts (``samples``) or 1 (``uniform``).

        ``num_samples`` is an int (one client) or a (K,) host array or tensor; ``train_loss`` the clients' mean local
        training loss, a 0-dim or (K,) tensor on the device. For one client the weight is a float
        (known on the host, so summing the client's state costs no extra device work); for K
        clients a (K,) tensor on ``train_loss``'s device.
        """
        if isinstance(num_samples, int):
            return float(num_samples) if self.weighting == "samples" else 1.0
        counts = host_to_device(num_samples, train_loss.device, train_loss.dtype)
        return counts if self.weighting == "samples" else torch.ones_like(counts)

    def pseudo_gradient(self, delta_sum: torch.Tensor, weight_sum, server: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N,) pseudo-gradient from the (N,) weighted delta sum, the scalar weight sum and the
        round's new server state (name -> view; empty without state)."""
        return -delta_sum / weight_sum

    def client_state(self, layout) -> StateParts:
        """Named per-client state kept in the client store (name -> floats; none here)."""
        return StateParts()

    def server_state(self, layout) -> StateParts:
        """Named server state broadcast every round, zero before round 1 (none here)."""
        return StateParts()

    def shape_run(self, run: LocalRun, inputs: RunInputs) -> LocalRun:
        """The client's training run, shaped by the strategy (a penalty, a correction); unchanged here."""
        return run

    def new_client_state(self, inputs: RunInputs, trained_params: torch.Tensor, steps: int,
                         lr: float) -> dict[str, torch.Tensor]:
        """The client's state after local training (called only with a declared client state):
        name -> tensor, from the (num_params,) trained parameters, the number of optimizer steps
        that trained the shared parameters and the client lr."""
        raise NotImplementedError

    def new_server_state(self, server: Mapping[str, torch.Tensor], change_sum: Mapping[str, torch.Tensor],
                         num_clients: int) -> dict[str, torch.Tensor]:
        """The server state after a round (name -> tensor), from the summed change of the cohort's
        client states (by the client state's names) and the total number of clients."""
        return dict(server)


def shared_only(state: torch.Tensor, inputs: RunInputs) -> torch.Tensor:
    """``state`` ((num_params,)) with its personal positions zeroed, in place: per-parameter state of
    the shared parameters only (personal layers are never averaged)."""
    state[inputs.personal_params] = 0.0
    return state
