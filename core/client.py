"""Local training of one client on the worker's single model replica, reset in place."""
from __future__ import annotations

import torch

from core.local_run import LocalRun
from core.model import training_loss
from core.optim import build_optimizer
from core.seeding import client_generator


class ClientTrainer:
    """Trains clients one after another on ``model`` (one replica per process).

    The replica's tensors are overwritten from the global flat vector before each client, the
    client's personal layers are written over it, and the optimizer's state is cleared; nothing
    is allocated per client beyond the batches.
    """

    def __init__(self, model, layout, loader, client_config, personal_index: torch.Tensor, seed: int,
                 personalization=None, personal_names=()):
        self.model = model
        self.loss = training_loss(model, client_config)
        self.layout = layout
        self.loader = loader
        self.epochs = client_config.local_epochs
        self.optimizer = build_optimizer(model.parameters(), client_config.optimizer_config)
        self.personal_index = personal_index
        self.seed = seed
        self.personalization = personalization
        # the client's training run before its strategy and method shape it
        self.default_run = (personalization.local_run(self.epochs) if personalization is not None
                            else LocalRun(phases=((self.epochs, "all"),)))
        personal = set(personal_names)
        self.param_is_personal = [name in personal for name, _ in model.named_parameters()]
        self.shared_positions = [i for i, mine in enumerate(self.param_is_personal) if not mine]
        # BatchNorm layers with running statistics, and whether they are personal: a phase that
        # freezes a layer's parameters also freezes its statistics (eval mode)
        self.norms = [(m, f"{n}.running_mean" in personal) for n, m in model.named_modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.bf16 = client_config.precision == "bf16"
        self.channels_last = client_config.channels_last

    def prepare(self, batch: dict) -> dict:
        """Put 4-D float inputs in channels_last when configured (no-op otherwise)."""
        if not self.channels_last:
            return batch
        return {k: v.contiguous(memory_format=torch.channels_last)
                if torch.is_tensor(v) and v.dim() == 4 and v.is_floating_point() else v for k, v in batch.items()}

    def load(self, global_flat: torch.Tensor, personal: torch.Tensor | None) -> None:
        """Set the replica to the global state, with ``personal`` (P,) at the personal positions."""
        if personal is not None and self.personal_index.numel():
            global_flat = global_flat.index_copy(0, self.personal_index, personal)
        self.layout.load_(global_flat)

    def _trainable(self, which: str) -> None:
        """Freeze all but ``which`` parameters (``all``, ``personal`` or ``shared``), and the running
        statistics of the frozen BatchNorm layers (eval mode: a frozen part is a fixed function)."""
        for param, personal in zip(self.model.parameters(), self.param_is_personal):
            param.requires_grad_(which == "all" or (which == "personal") == personal)
        for module, personal in self.norms:
            module.train(self.model.training and (which == "all" or (which == "personal") == personal))

    def train(self, round_idx: int, client_id: int, indices: torch.Tensor, global_flat: torch.Tensor,
              personal: torch.Tensor | None, run: LocalRun | None = None) -> torch.Tensor:
        """Train the client on its samples ``indices`` (int64, on the device) as ``run`` describes
        (:class:`core.local_run.LocalRun`; None: :attr:`default_run`, the method's phases).

        Starts from the (N,) ``global_flat`` with the (P,) ``personal`` layers written over it. The
        trained state is left in the replica (read it with the layout); ``last_steps`` holds the
        number of steps and ``shared_steps`` those that trained the shared (aggregated) parameters
        (FedRep's head epochs do not). Each step adds ``run.penalty(params)`` to the loss, calls
        ``run.step_hook(batch)`` after the backward pass (the replica still holds the step's
        starting weights), steps the optimizer, then moves the trained weights by ``-lr *
        run.correction``; ``run.step(batch)`` replaces all of it. Returns the mean training loss
        as a 0-dim tensor (no host sync).
        """
        run = self.default_run if run is None else run
        self.load(global_flat, personal)
        self.optimizer.state.clear()
        generator = client_generator(indices.device, self.seed, round_idx, client_id, run.stream)
        self.model.train()
        losses: list[torch.Tensor] = []  # step losses, reduced once per client: no kernel per step
        self.shared_steps = 0
        for phase_epochs, part in run.phases:
            self._trainable(part)
            before = len(losses)
            self._epochs(phase_epochs, indices, generator, run, losses)
            if part != "personal":
                self.shared_steps += len(losses) - before
        self._trainable("all")
        self.last_steps = len(losses)
        return torch.stack(losses).mean() if losses else torch.zeros((), device=indices.device)

    @torch.no_grad()
    def _shift(self, params: list[torch.Tensor], shifts: list[torch.Tensor]) -> None:
        """``w -= lr * shift`` for the parameters trained in this step (SCAFFOLD's correction, applied
        after the optimizer step so that momentum does not amplify it)."""
        lr = self.optimizer.param_groups[0]["lr"]
        trained = [(p, s) for p, s in zip(params, shifts) if p.grad is not None]
        if trained:
            torch._foreach_add_([p for p, _ in trained], [s for _, s in trained], alpha=-lr)

    def _epochs(self, epochs: int, indices, generator, run: LocalRun, losses: list) -> None:
        """Train ``epochs`` epochs over ``indices``, appending each step's detached loss to ``losses``."""
        params = list(self.model.parameters())
        for _ in range(epochs):
            for batch in self.loader.batches(indices, generator):
                batch = self.prepare(batch)
                if run.step is not None:
                    losses.append(run.step(batch).detach())
                    continue
                with torch.autocast(indices.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = self.loss(batch)
                if run.penalty is not None:
                    loss = loss + run.penalty(params)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if run.step_hook is not None:
                    run.step_hook(batch)
                self.optimizer.step()
                if run.correction is not None:
                    self._shift(params, run.correction)
                losses.append(loss.detach())
