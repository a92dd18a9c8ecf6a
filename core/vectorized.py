"""Train a group of clients at once: torch.func ``functional_call`` + ``vmap`` over stacked parameters.

Each client keeps its own data order (its own generator, drawn exactly as in sequential training)
and its own SGD state; only the arithmetic is batched across clients. With SGD and a model without
randomness (no dropout) the result equals sequential training up to float summation order.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from core.distributed import host_to_device
from core.errors import UserError
from core.local_run import LocalRun, RunInputs
from core.seeding import client_generator


class LossCall(nn.Module):
    """Makes ``model.loss(batch)`` the forward of a module, so functional_call can run it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch)  # type: ignore[operator]  # the task model's loss (core.model.BaseModel)


def check_vectorizable(model: nn.Module, client_config, personalization=None) -> None:
    """Raise UserError unless the model has no BatchNorm, the client optimizer is SGD, compile is
    off and every client trains all its parameters together (one training phase)."""
    if personalization is not None and len(personalization.training_phases(1)) != 1:
        raise UserError(f"client_config.vectorize does not support personalization.method "
                        f"{personalization.name} (several training phases); set vectorize: false")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError("client_config.vectorize needs a model without BatchNorm (use GroupNorm or none); "
                        "set client_config.vectorize: false for this model")
    if client_config.compile:
        raise UserError("client_config.compile applies to sequential client training only; "
                        "set client_config.compile: false or vectorize: false")
    if client_config.optimizer_config.type != "sgd":
        raise UserError("client_config.vectorize supports client optimizer type sgd only; "
                        "set client_config.optimizer_config.type: sgd or vectorize: false")


class VectorizedTrainer:
    """Trains up to ``chunk`` clients together on stacked copies of the parameters.

    Per step, the active clients are grouped by batch size (the last batch of a client can be
    smaller); each group runs one vmapped forward/backward and one stacked SGD update
    (torch.optim.SGD semantics: weight decay, momentum with first buffer = gradient, Nesterov).
    """

    def __init__(self, model, layout, loader, client_config, seed: int, strategy, personalization,
                 shared_positions: list[int]):
        check_vectorizable(model, client_config, personalization)
        if personalization is not None and personalization.model_state(layout).numel:
            raise UserError(f"client_config.vectorize does not support personalization.method "
                            f"{personalization.name} (a personal model per client); set vectorize: false")
        if strategy.client_state(layout).numel or strategy.server_state(layout).numel:
            raise UserError(f"client_config.vectorize does not support strategy {strategy.name}; set vectorize: false")
        self.call = LossCall(model)
        self.layout = layout
        self.loader = loader
        self.epochs = client_config.local_epochs
        self.opt = client_config.optimizer_config
        self.seed = seed
        self.strategy = strategy
        self._penalty: Callable[[list], torch.Tensor] | None = None  # the strategy's, for the round's group
        self.autocast = dict(device_type=loader.device.type, dtype=torch.bfloat16,
                             enabled=client_config.precision == "bf16")
        self.names = [f"model.{n}" for n, _ in model.named_parameters()]
        self.shared = shared_positions  # parameters FedProx pulls (ClientTrainer.shared_positions)
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.buffers = {f"model.{n}": b for n, b in model.named_buffers()}
        step = grad_and_value(self._loss)
        self.step = vmap(step, in_dims=(0, 0), randomness="different")

    def _loss(self, params: dict, batch: dict) -> torch.Tensor:
        with torch.autocast(**self.autocast):
            loss = functional_call(self.call, (params, self.buffers), (batch,))
        if self._penalty is not None:
            loss = loss + self._penalty([params[n] for n in self.names])
        return loss

    def _streams(self, round_idx, client_ids, indices):
        """Per client, an iterator over its batch plans (when the loader has them) or batches,
        drawn from its own generator exactly as in sequential training."""
        draw = self.loader.plan_batches if self.loader.has_batch_plans else self.loader.batches

        def stream(cid, idx):
            generator = client_generator(idx.device, self.seed, round_idx, cid)
            for _ in range(self.epochs):
                yield from draw(idx, generator)
        return [stream(int(c), i) for c, i in zip(client_ids, indices)]

    def _stacked(self, items: list[dict]) -> dict:
        """The (G, B, ...) batch of G equally sized plans (one collate call) or batches (stacked)."""
        if not self.loader.has_batch_plans:
            return {key: torch.stack([b[key] for b in items]) for key in items[0]}
        return {key: v.unflatten(0, (len(items), -1)) for key, v in self.loader.collate(items).items()}

    def _update(self, stack, momentum, rows: list[int], rows_t: torch.Tensor, grads) -> None:
        """SGD on rows ``rows`` (host list; ``rows_t`` the same on the device) of the (C, P) parameter
        stack with (len(rows), P) gradients."""
        o = self.opt
        params = stack[rows_t]
        if o.weight_decay:
            grads = grads.add(params, alpha=o.weight_decay)
        if o.momentum:
            buf = momentum[rows_t]
            fresh = host_to_device(~self._has_momentum[rows], stack.device)
            buf = torch.where(fresh[:, None], grads, buf.mul(o.momentum).add_(grads))
            momentum[rows_t] = buf
            self._has_momentum[rows] = True
            grads = grads.add(buf, alpha=o.momentum) if o.nesterov else buf
        stack[rows_t] = params.sub_(grads, alpha=o.lr)

    def train_group(self, round_idx: int, client_ids, indices: list, global_flat: torch.Tensor,
                    personal: torch.Tensor | None, personal_index: torch.Tensor):
        """Train clients ``client_ids`` (their sample indices in ``indices``) from ``global_flat``.

        Args:
            personal: (C, P) personal vectors to start from, or None.
        Returns:
            (C, num_params) trained parameter rows and (C,) mean training losses.
        """
        count, k = len(client_ids), self.layout.num_params
        inputs = RunInputs(self.layout, global_flat, {}, {}, self.shared)
        run = self.strategy.shape_run(LocalRun(phases=((self.epochs, "all"),)), inputs)
        if run.correction is not None or run.step_hook is not None or run.step is not None:
            raise UserError(f"client_config.vectorize does not support strategy {self.strategy.name} "
                            f"(a per-step correction or hook); set vectorize: false")
        self._penalty = run.penalty
        start = global_flat.unsqueeze(0).repeat(count, 1)
        if personal is not None and personal_index.numel():
            start[:, personal_index] = personal
        stack = start[:, :k].contiguous()
        momentum = torch.zeros_like(stack) if self.opt.momentum else None
        self._has_momentum = np.zeros(count, dtype=bool)  # host-side: no device sync per step
        loss_sum = torch.zeros(count, device=stack.device)
        steps = torch.zeros(count, device=stack.device)
        streams = self._streams(round_idx, client_ids, indices)
        active = list(range(count))
        while active:
            drawn = {}  # client row -> its next batch plan (or batch)
            for i in active:
                item = next(streams[i], None)
                if item is not None:
                    drawn[i] = item
            active = list(drawn)
            sizes = {i: len(next(iter(item.values()))) for i, item in drawn.items()}
            for size in sorted(set(sizes.values())):
                rows = [i for i in active if sizes[i] == size]
                self._step(stack, momentum, rows, self._stacked([drawn[i] for i in rows]), loss_sum, steps)
        return stack, loss_sum / steps.clamp(min=1)

    def _views(self, stack: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter (C, *shape) views into the rows of a (C, P) stack."""
        return [v.view(stack.shape[0], *s) for v, s in zip(stack.split(self.numels, dim=1), self.shapes)]

    def _update_all(self, stack, momentum, grads: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """The SGD step of :meth:`_update` in place on every row, without gathering or concatenating."""
        o = self.opt
        params = self._views(stack)
        if o.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=o.weight_decay)
        if o.momentum:
            bufs = self._views(momentum)
            if self._has_momentum[0]:
                torch._foreach_mul_(bufs, o.momentum)
                torch._foreach_add_(bufs, grads)
            else:
                torch._foreach_copy_(bufs, grads)
            self._has_momentum[:] = True
            grads = torch._foreach_add(grads, bufs, alpha=o.momentum) if o.nesterov else bufs
        torch._foreach_add_(params, grads, alpha=-o.lr)

    def _step(self, stack, momentum, rows, batch: dict, loss_sum, steps) -> None:
        """One vmapped forward/backward and SGD step of clients ``rows`` on their (G, B, ...) ``batch``."""
        every_row = len(rows) == stack.shape[0] and len(set(self._has_momentum.tolist())) == 1
        rows_t = None if every_row else host_to_device(np.asarray(rows), stack.device)
        params = dict(zip(self.names, self._views(stack if every_row else stack[rows_t])))
        grads, losses = self.step(params, batch)
        if every_row:
            self._update_all(stack, momentum, [grads[n] for n in self.names])
            loss_sum.add_(losses.detach())
            steps.add_(1)
            return
        flat_grad = torch.cat([grads[n].reshape(len(rows), -1) for n in self.names], dim=1)
        assert rows_t is not None  # set whenever not every row steps
        self._update(stack, momentum, rows, rows_t, flat_grad)
        loss_sum.index_add_(0, rows_t, losses.detach())
        steps.index_add_(0, rows_t, torch.ones_like(losses))
