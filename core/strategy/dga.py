"""DGA: dynamic gradient aggregation, clients weighted by a softmax of their training losses."""
from __future__ import annotations

import torch
from pydantic import Field

from core.strategy.fedavg import FedAvg


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
    summary = "softmax weights of the training losses (FLUTE)"
    dp_refusal = "its client weights depend on each client's training loss, so one client's weight is not bounded"
    exact_sum = False  # the weights need the cohort's best loss, known only after training (see below)

    class Options(FedAvg.Options):
        softmax_beta: float = Field(1.0, ge=0, description="DGA: client weight exp(-softmax_beta * mean training loss)")

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

