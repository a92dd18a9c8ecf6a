"""Aggregation strategies: client weights, what a client adds to its loss, and how the summed
deltas become a pseudo-gradient for the server optimizer."""
from __future__ import annotations

import numpy as np
import torch

from core.distributed import host_to_device
from core.errors import UserError


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
    """

    name = "fedavg"
    has_local_penalty = False
    relative_weights = False  # True: weights are exp(log_weight), meaningful only up to a common factor
    # True: the weights are known before training (cohort_weights), so the workers sum the clients'
    # terms in fixed point, the same bit for bit however the cohort is split (core/exact.py);
    # False: float32 sums, which depend on the split and order at the level of float rounding
    exact_sum = True

    def __init__(self, strategy_config):
        self.weighting = strategy_config.client_weighting

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

    def pseudo_gradient(self, delta_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
        """(N,) pseudo-gradient from the (N,) weighted delta sum and the scalar weight sum."""
        return -delta_sum / weight_sum

    def local_penalty(self, params: list[torch.Tensor], anchors: list[torch.Tensor]):
        """A term added to every local training step's loss (None: nothing added)."""
        return None

    def client_state_numel(self, layout) -> int:
        """Floats of per-client strategy state kept in the client store (0: none)."""
        return 0

    def server_state_numel(self, layout) -> int:
        """Floats of server-side strategy state broadcast every round (0: none)."""
        return 0

    def gradient_correction(self, server_state: torch.Tensor, client_state: torch.Tensor):
        """(num_params,) correction c: every local step also moves the weights by ``-lr * c`` (or None)."""
        return None

    def new_client_state(self, server_state, client_state, global_params, trained_params, steps: int, lr: float):
        """The client's state after local training (only called when client_state_numel > 0)."""
        raise NotImplementedError

    def new_server_state(self, server_state, client_state_change_sum, num_clients: int):
        """The server state after a round, from the summed change of the cohort's client states."""
        return server_state


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, arXiv:1812.06127): each local step minimises
    ``loss + mu/2 * ||w - w_global||^2`` (``strategy_config.mu``), added once per step.

    ``w`` is the shared parameters only: with personal layers (FedPer, FedRep, LG-FedAvg, FedBN)
    the global copy of a personal layer is never trained, so pulling toward it would pull the
    client's own layer back to its initial values.
    """

    name = "fedprox"
    has_local_penalty = True

    def __init__(self, strategy_config):
        super().__init__(strategy_config)
        self.mu = strategy_config.mu

    def local_penalty(self, params, anchors):
        """``mu/2 * sum ||p - a||^2`` over the parameters and their global values (0-dim tensor)."""
        return 0.5 * self.mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020, arXiv:1910.06378), control variates of option II.

    Every local step is corrected by ``c - c_i`` (server control minus the client's control, kept
    per client in the client store, zero before a client's first round): after the optimizer step,
    ``y -= lr * (c - c_i)``. With plain SGD this is the paper's corrected gradient step; with
    momentum the correction stays outside the momentum buffer (as in Flower's niid_bench baseline),
    since inside it the controls, estimated as ``(x - y) / (K lr)``, would be amplified round after
    round. After K local steps with learning rate lr: ``c_i+ = c_i - c + (x - y) / (K lr)``; the
    server sets ``c += sum(c_i+ - c_i) / num_clients``.

    With personal layers the controls cover the shared parameters only (the worker zeroes ``c_i+``
    at personal positions, so ``c`` and the corrections are zero there too): a personal layer is
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

    def client_state_numel(self, layout):
        return layout.num_params

    def server_state_numel(self, layout):
        return layout.num_params

    def gradient_correction(self, server_state, client_state):
        return server_state - client_state

    def new_client_state(self, server_state, client_state, global_params, trained_params, steps, lr):
        return client_state - server_state + (global_params - trained_params) / (max(steps, 1) * lr)

    def new_server_state(self, server_state, client_state_change_sum, num_clients):
        return server_state + client_state_change_sum / num_clients


class DGA(FedAvg):
    """Dynamic Gradient Aggregation (Dimitriadis et al. 2021, arXiv:2106.07578), after FLUTE's ``DGA``.

    A client's weight is ``exp(-softmax_beta * train_loss)`` (its mean local training loss), so
    after normalisation by the weight sum the cohort's deltas are averaged with softmax weights of
    the negated losses: clients that fit their data better count more, and ``softmax_beta = 0`` is
    the uniform average. Sample counts are not used (as in FLUTE).

    The softmax is shifted (log-sum-exp): the worker weighs each client by
    ``exp(log_weight - shift)``, with ``shift`` the largest log-weight of the round's cohort (over
    every rank), so the best client weighs 1 and the weights depend only on the loss gaps, never on
    the loss level (an unshifted ``exp`` underflows once ``softmax_beta * loss`` passes about 87 in
    float32). See ``core.worker.RelativeWeights``.

    DGA's sum is not order-independent: a client's weight relative to the cohort's best is known
    only once every client has trained, after its delta was added, so the deltas are summed in
    float32 with the running shift, and the sum depends on which rank trained which client and in
    what order at the level of float rounding (1 and 3 processes agree to about 1e-7, not bit for
    bit). An exact fixed-point form would need the shift before the first client is added, or the
    deltas kept until the end (memory per rank growing with the cohort).

    FLUTE's ``train_loss`` weighting divides the sum of the step losses by the samples processed,
    which is about the mean loss divided by the batch size; so FLUTE's ``softmax_beta`` b matches
    b / batch_size here.
    """

    name = "dga"
    relative_weights = True
    exact_sum = False  # the weights need the cohort's best loss, known only after training (see below)

    def __init__(self, strategy_config):
        super().__init__(strategy_config)
        self.beta = strategy_config.softmax_beta

    def log_weight(self, train_loss: torch.Tensor) -> torch.Tensor:
        """``-softmax_beta * train_loss``, shaped like ``train_loss`` (the weight is its exp, up to a
        common factor)."""
        return -self.beta * train_loss

    def client_weight(self, num_samples, train_loss):
        """``exp(-softmax_beta * train_loss)`` unshifted (for a reader; the worker shifts, see above)."""
        return torch.exp(self.log_weight(train_loss))


STRATEGIES = {cls.name: cls for cls in (FedAvg, FedProx, Scaffold, DGA)}


def build_strategy(name: str, strategy_config):
    """The strategy registered under ``name`` (config key ``strategy``)."""
    if name not in STRATEGIES:
        raise UserError(f"strategy: unknown {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](strategy_config)
