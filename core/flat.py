"""One contiguous float32 vector for a module's parameters and buffers (the unit that travels)."""
from __future__ import annotations

import torch
from torch import nn


class StateLayout:
    """Fixed order of a module's parameters, then its buffers, in one flat float32 vector.

    ``num_params`` elements of parameters come first (the part a server optimizer steps), buffers
    (e.g. BatchNorm running statistics, stored as float32 even when integer) follow. The layout
    holds references to the module's live tensors, so :meth:`load_` resets a replica in place.
    """

    def __init__(self, module: nn.Module):
        params = list(module.named_parameters())
        buffers = [(n, b) for n, b in module.named_buffers() if b is not None]
        self.names = [n for n, _ in params + buffers]
        self.tensors = [t for _, t in params + buffers]
        self.numels = [t.numel() for t in self.tensors]
        self.num_params = sum(t.numel() for _, t in params)
        self._param_shapes = [t.shape for _, t in params]
        self.numel = sum(self.numels)
        self._float = [t for t in self.tensors if t.is_floating_point()]
        self._float_pos = [i for i, t in enumerate(self.tensors) if t.is_floating_point()]

    def flatten(self) -> torch.Tensor:
        """Copy of the module's state as a (numel,) float32 tensor on the module's device."""
        return torch.cat([t.detach().reshape(-1).float() for t in self.tensors])

    def load_(self, flat: torch.Tensor) -> None:
        """Copy a (numel,) vector into the module's tensors in place (no new tensors on the module);
        integer buffers (BatchNorm's ``num_batches_tracked``) take the nearest integer."""
        views = flat.split(self.numels)
        with torch.no_grad():
            torch._foreach_copy_(self._float, [views[i].view_as(self.tensors[i]) for i in self._float_pos])
            for t, v in zip(self.tensors, views):
                if not t.is_floating_point():  # a weighted mean of counts: nearest integer, not truncated
                    t.copy_(v.round().view_as(t))

    def param_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of the parameter part of ``flat`` shaped like the module's parameters, in order."""
        views = flat[:self.num_params].split(self.numels[:len(self._param_shapes)])
        return [v.view(shape) for v, shape in zip(views, self._param_shapes)]

    def accumulate_delta_(self, out: torch.Tensor, alpha: float | torch.Tensor, origin: torch.Tensor) -> None:
        """``out += alpha * (state - origin)`` for (numel,) ``out`` and ``origin``, read straight from
        the module (no flat copy of the state).

        The difference comes first: a trained weight and its global value are close, so their
        float32 difference is exact (Sterbenz), and the sum then adds small deltas. Adding
        ``alpha * state`` and subtracting ``sum(alpha) * origin`` at the end, as before, rounded each
        whole weight (about 6e-8 for weights near 1) and lost a fifth of a 1e-5 update at 1,000
        clients (testing/test_aggregation_precision.py). ``alpha`` is a number or a 0-dim tensor on
        the module's device (no host sync either way).
        """
        views, starts = out.split(self.numels), origin.split(self.numels)
        floats = [t.reshape(-1) for t in self._float]
        with torch.no_grad():
            targets = [views[i] for i in self._float_pos]
            deltas = torch._foreach_sub(floats, [starts[i] for i in self._float_pos])
            if torch.is_tensor(alpha):
                torch._foreach_mul_(deltas, alpha)
                torch._foreach_add_(targets, deltas)
            else:
                torch._foreach_add_(targets, deltas, alpha=alpha)
            for v, t, o in zip(views, self.tensors, starts):
                if not t.is_floating_point():
                    v.add_((t.view(-1).float() - o) * alpha)

    def delta_(self, out: torch.Tensor, origin: torch.Tensor, state: torch.Tensor | None = None) -> None:
        """``out = state - origin`` in float32 for (numel,) ``out`` and ``origin``: the module's state
        (or ``state``, a flat copy of it already made) minus the global one, entry for entry the
        difference :meth:`accumulate_delta_` forms (exact for a trained weight near its global value;
        integer buffers as float32). The input of a fixed-point sum (:mod:`core.exact`)."""
        with torch.no_grad():
            if state is None:
                torch.cat([t.detach().reshape(-1) for t in self.tensors], out=out)
                out.sub_(origin)
            else:
                torch.sub(state, origin, out=out)

    def keep_if_finite_(self, *extra: torch.Tensor, sync_free: bool | None = None) -> torch.Tensor:
        """Check that the module's state and the ``extra`` tensors (a loss, a personal model) are
        finite; if not, zero the module's floating-point state in place, so that adding it to a sum
        with any weight adds nothing (``0 * NaN`` would be NaN).

        Returns a 0-dim bool tensor on the module's device, True when everything was finite; a finite
        state is left bit for bit as it was. "Finite" is judged on per-tensor float32 sums: NaN or inf
        anywhere makes them non-finite, and so do values large enough for a sum to pass float32's
        range (about 3.4e38), which only a diverged model reaches. On the CPU the answer is read on
        the host (free there); on other devices (or with ``sync_free``) nothing waits for the device:
        NaN and inf are replaced by 0 and the state multiplied by the answer (two passes, no sync).
        """
        with torch.no_grad():
            ok = _all_finite(self._float + [t.detach() for t in extra])
            if not (ok.device.type != "cpu" if sync_free is None else sync_free):
                if not ok:
                    torch._foreach_zero_(self._float)
                return ok
            for t in self._float:
                t.nan_to_num_(0.0, 0.0, 0.0)
            torch._foreach_mul_(self._float, ok.to(self._float[0].dtype))
        return ok

    @staticmethod
    def matches(name: str, prefix: str) -> bool:
        """True when ``prefix`` is ``name`` or a whole leading module path of it (``linear`` matches
        ``linear.weight``, not ``linear2.weight``)."""
        return name == prefix or name.startswith(prefix + ".")

    def names_matching(self, prefixes: list[str]) -> list[str]:
        """Tensor names (in layout order) matched by any of ``prefixes``."""
        return [n for n in self.names if any(self.matches(n, p) for p in prefixes)]

    def index_of(self, prefixes: list[str]) -> torch.Tensor:
        """int64 positions in the flat vector of every tensor whose name starts with a prefix.

        A prefix matches a whole module path component: ``linear`` matches ``linear.weight`` but
        not ``linear2.weight``. Returns an empty tensor when ``prefixes`` is empty.
        """
        starts = [0]
        for n in self.numels:
            starts.append(starts[-1] + n)
        chosen = [torch.arange(starts[i], starts[i + 1]) for i, name in enumerate(self.names)
                  if any(self.matches(name, p) for p in prefixes)]
        return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)

    def unmatched(self, prefixes: list[str]) -> list[str]:
        """The prefixes that match no tensor name."""
        return [p for p in prefixes if not self.names_matching([p])]


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool: whether the float32 sums of ``tensors`` (and their total) are finite (no host sync)."""
    return torch.isfinite(torch.stack([t.sum().float() for t in tensors]).sum())


def keep_rows_if_finite_(stack: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Row-wise :meth:`StateLayout.keep_if_finite_` for a (C, P) ``stack`` of client states and
    their (C,) ``losses``: rows whose values or loss are not finite are zeroed in place. Returns the
    (C,) bool answer (True: finite), without a host sync."""
    with torch.no_grad():
        ok = torch.isfinite(stack.sum(1) + losses)
        stack.nan_to_num_(0.0, 0.0, 0.0).mul_(ok.unsqueeze(1).to(stack.dtype))
    return ok
