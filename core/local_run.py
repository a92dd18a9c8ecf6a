"""One description of a client's local run, and the named state an algorithm declares (issue 24).

A strategy or personalization method never adds a keyword to the trainer: it shapes a
:class:`LocalRun` (phases, a loss penalty, a post-step correction, a step hook or a whole
replacement step, the RNG stream) and declares the per-client and server state it keeps as named
parts (:class:`StateParts`: name -> numel); the engine lays out the client store rows and round
buffers from those declarations and hands each hook named views.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional

import torch

Penalty = Callable[[list], torch.Tensor]  # the model's parameters (in order) -> a loss term (0-dim)


@dataclass(frozen=True)
class LocalRun:
    """How one client trains once (see :meth:`core.client.ClientTrainer.train`).

    Attributes:
        phases: (epochs, which parameters train: ``all``, ``personal`` or ``shared``) in order.
        stream: the client's RNG stream (0: training; 1, 2, 3: fine-tuning, new clients, Ditto's
            personal model), so that extra runs never shift the training data order.
        penalty: added to every step's loss (FedProx, FedDyn, Ditto's proximal term), or None.
        correction: per-parameter tensors c (shapes of the parameters): every step moves the trained
            weights by ``-lr * c`` after the optimizer step (SCAFFOLD), or None.
        step_hook: ``step_hook(batch)`` after the backward pass, before the optimizer step, while
            the replica holds the step's starting weights (APFL), or None.
        step: ``step(batch) -> loss`` replaces the whole step (forward, backward, update) for a
            method whose update is not an optimizer step on the loss (pFedMe), or None.
    """

    phases: tuple[tuple[int, str], ...]
    stream: int = 0
    penalty: Optional[Penalty] = None
    correction: Optional[list] = None
    step_hook: Optional[Callable[[dict], None]] = None
    step: Optional[Callable[[dict], torch.Tensor]] = None

    def but(self, **changes) -> "LocalRun":
        """A copy with ``changes`` (field name -> value)."""
        return replace(self, **changes)


def epochs_of(epochs: int, which: str = "all", stream: int = 0) -> LocalRun:
    """A run of ``epochs`` epochs training the ``which`` parameters, on RNG stream ``stream``."""
    return LocalRun(phases=((epochs, which),), stream=stream)


def proximal(mu: float, anchors: list, positions: Optional[list[int]] = None) -> Penalty:
    """The penalty ``mu/2 * sum ||p - a||^2`` over the parameters at ``positions`` (all when None)
    and their ``anchors`` (tensors shaped like those parameters, in the same order)."""
    if positions is None:
        return lambda params: 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
    return lambda params: 0.5 * mu * sum((params[i] - a).pow(2).sum() for i, a in zip(positions, anchors))


class RunInputs:
    """What a strategy's hooks see of one client's round, by name.

    ``layout``: the model's :class:`core.flat.StateLayout`; ``global_flat``: the (N,) global state;
    ``server`` / ``client``: name -> view of the server state and of the client's stored state (as
    the strategy declared them; empty without state); ``shared``: positions (in the model's
    parameter order) of the shared parameters; ``personal_params``: positions, among the first
    ``layout.num_params`` floats, of the personal parameters (int64 tensor; None where no hook
    writes client state, as in vectorized training).
    """

    def __init__(self, layout, global_flat: torch.Tensor, server: Mapping[str, torch.Tensor],
                 client: Mapping[str, torch.Tensor], shared: list[int], personal_params: Optional[torch.Tensor] = None):
        self.layout, self.global_flat, self.server, self.client = layout, global_flat, server, client
        self.shared, self.personal_params = shared, personal_params

    def anchors(self) -> list[torch.Tensor]:
        """The global model's parameters as per-parameter views (the model's parameter order)."""
        return self.layout.param_views(self.global_flat)


@dataclass(frozen=True)
class StateParts:
    """Named flat state (name -> numel) packed in order into one float32 vector.

    A strategy declares its per-client and its server state this way, a personalization method its
    separate personal model; :meth:`views` hands a vector's parts to the algorithm's hooks by name.
    """

    sizes: Mapping[str, int] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Floats of the whole vector (0: no state)."""
        return sum(self.sizes.values())

    def views(self, vector: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Name -> view of ``vector`` ((numel,) float32); an empty dict for None or no state.

        Raises:
            ValueError: ``vector`` does not hold exactly :attr:`numel` floats.
        """
        if vector is None or not self.sizes:
            return {}
        if vector.numel() != self.numel:
            raise ValueError(f"state of parts {dict(self.sizes)} needs {self.numel} floats, got {vector.numel()}")
        return dict(zip(self.sizes, vector.split(list(self.sizes.values()))))

    def flat(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The (numel,) vector of ``parts`` (name -> tensor) in declared order.

        Raises:
            ValueError: a part is missing, extra or of the wrong size.
        """
        if set(parts) != set(self.sizes) or any(parts[n].numel() != k for n, k in self.sizes.items()):
            raise ValueError(f"state parts {{{', '.join(f'{n}: {v.numel()}' for n, v in parts.items())}}} do not "
                             f"match the declared {dict(self.sizes)}")
        return torch.cat([parts[n].reshape(-1) for n in self.sizes])
