"""The messages of a run, declared once as ordered named parts (issue 24).

Every collective of a run carries one flat buffer: rank 0 fills it, or every rank fills its own
share of a sum. A :class:`Message` declares that buffer as ordered named parts (name -> shape,
dtype) packed into one tensor of a carrier dtype; it allocates the buffer, gives named views into
it for writing and reading, and checks a buffer or a payload against the declaration before any
collective sees it. Rank 0 and the other ranks build each message from the same declaration
function below (:func:`round_broadcast`, :func:`round_reduce`, :func:`eval_broadcast`,
:func:`eval_reduce`, :func:`start_broadcast`), so their sizes cannot diverge, and a buffer that
does not match is a :class:`MessageMismatch` naming the message and its parts, not a hang in the
collective.

A part whose dtype is narrower than the carrier is packed at a byte offset aligned to its own item
size: the exact-sum reduce's float32 parts travel two per int64 (``buf.view(torch.float32)``), bit
for bit (see :mod:`core.exact`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch

GO, STOP = 1.0, 0.0  # the control value that ends every broadcast of a round or an evaluation

Value = Union[torch.Tensor, float, Sequence[torch.Tensor]]


class MessageMismatch(ValueError):
    """A buffer or a payload does not match its message's declaration (total size, dtype, a part
    missing, extra, or of the wrong number of elements)."""


@dataclass(frozen=True)
class Part:
    """One named part of a message: ``shape`` (() for a scalar) of ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        """Elements of the part (1 for a scalar)."""
        out = 1
        for d in self.shape:
            out *= d
        return out


class Message:
    """A flat buffer of ``dtype`` (the carrier) holding ``parts`` in order, each at a byte offset
    aligned to its item size; the total is padded to whole carrier elements.

    Raises:
        MessageMismatch: two parts share a name, a dimension is negative, or a part's item size is
            larger than the carrier's (it could not be viewed in place).
    """

    def __init__(self, name: str, parts: Sequence[Part], dtype: torch.dtype = torch.float32):
        self.name, self.dtype = name, dtype
        self.parts: dict[str, Part] = {}
        self._offsets: dict[str, int] = {}  # in elements of the part's own dtype
        carrier = dtype.itemsize
        nbytes = 0
        for part in parts:
            if part.name in self.parts:
                raise MessageMismatch(f"{name}: part '{part.name}' declared twice")
            if any(d < 0 for d in part.shape) or part.dtype.itemsize > carrier:
                raise MessageMismatch(f"{name}: part '{part.name}' {tuple(part.shape)} {part.dtype} cannot be "
                                      f"packed in a {dtype} buffer")
            size = part.dtype.itemsize
            nbytes = -(-nbytes // size) * size  # aligned to the part's item size
            self.parts[part.name] = part
            self._offsets[part.name] = nbytes // size
            nbytes += part.numel * size
        self.numel = -(-nbytes // carrier)  # carrier elements of the buffer
        self.padded = self.numel * carrier != nbytes  # bytes after the last part (zeroed by build)

    def describe(self) -> str:
        """The declaration in words, e.g. ``global (100,) | control () (101 torch.float32)``."""
        parts = " | ".join(f"{p.name} {tuple(p.shape)}" + ("" if p.dtype == self.dtype else f" {p.dtype}")
                           for p in self.parts.values())
        return f"{parts} ({self.numel} {self.dtype})"

    def zeros(self, device) -> torch.Tensor:
        """A zeroed (numel,) buffer of the carrier dtype on ``device``."""
        return torch.zeros(self.numel, dtype=self.dtype, device=device)

    def empty(self, device) -> torch.Tensor:
        """An uninitialised (numel,) buffer (to receive a broadcast)."""
        return torch.empty(self.numel, dtype=self.dtype, device=device)

    def check(self, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` itself, once it is a contiguous (numel,) tensor of the carrier dtype.

        Raises:
            MessageMismatch: another dtype, shape or size, naming the declared parts.
        """
        if buf.dtype != self.dtype or buf.dim() != 1 or buf.numel() != self.numel or not buf.is_contiguous():
            raise MessageMismatch(f"{self.name}: a buffer of {tuple(buf.shape)} {buf.dtype} does not match the "
                                  f"declaration {self.describe()}")
        return buf

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """The part ``name`` of ``buf`` as a view of its declared shape and dtype (writes go into
        ``buf``).

        Raises:
            MessageMismatch: ``buf`` does not match (:meth:`check`), or no part is called ``name``.
        """
        part = self.parts.get(name)
        if part is None:
            raise MessageMismatch(f"{self.name}: no part '{name}' in {self.describe()}")
        flat = self.check(buf) if part.dtype == self.dtype else self.check(buf).view(part.dtype)
        start = self._offsets[name]
        return flat[start:start + part.numel].view(part.shape)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every part of ``buf`` by name, as views (see :meth:`view`)."""
        self.check(buf)
        return {name: self.view(buf, name) for name in self.parts}

    def build(self, device, values: Mapping[str, Value]) -> torch.Tensor:
        """A new buffer on ``device`` holding ``values``, one per declared part and no other: a
        tensor of the part's number of elements (any shape, device; cast to the part's dtype), a
        number (filled in), or a sequence of one tensor per row of a part's first dimension (or no
        rows for a part of 0 elements). One
        copy of each value, like ``torch.cat``; a buffer left over after padding is zero.

        Raises:
            MessageMismatch: a part missing or extra, or a value of the wrong number of elements,
                raised before anything is sent.
        """
        missing, extra = set(self.parts) - set(values), set(values) - set(self.parts)
        if missing or extra:
            words = [f"missing {sorted(missing)}"] * bool(missing) + [f"undeclared {sorted(extra)}"] * bool(extra)
            raise MessageMismatch(f"{self.name}: payload parts {', '.join(words)}; declared {self.describe()}")
        buf = self.zeros(device) if self.padded else self.empty(device)
        for name, value in values.items():
            _write(self.view(buf, name), value, f"{self.name}: part '{name}'")
        return buf


def _write(view: torch.Tensor, value: Value, what: str) -> None:
    """Copy ``value`` into ``view`` (see :meth:`Message.build`); raises MessageMismatch on a size
    that is not the declared one."""
    if isinstance(value, (int, float)):
        view.fill_(value)
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != view.numel():
            raise MessageMismatch(f"{what} has {value.numel()} elements, declared {tuple(view.shape)}")
        view.copy_(value.reshape(view.shape))
        return
    rows = list(value)
    if not rows and view.numel() == 0:  # (T, 0): nothing to write
        return
    if view.dim() == 0 or len(rows) != view.shape[0]:
        raise MessageMismatch(f"{what} has {len(rows)} rows, declared {tuple(view.shape)}")
    for i, row in enumerate(rows):
        _write(view[i], row, f"{what} row {i}")


# ---- the declarations: one function per message, called alike on every rank -----------------------

def round_broadcast(n: int, s: int, k: int, width: int, clip: bool = False) -> Message:
    """A round's broadcast, float32: ``global`` (N,) state | ``server_state`` (S,) | ``slots`` (K,
    P + C + M), one per cohort client | ``control`` () GO, or STOP when the server ends the run | with
    ``clip`` (adaptive clipping) ``clip_norm`` (), the round's L2 bound of a client's update."""
    return Message("round broadcast", [Part("global", (n,)), Part("server_state", (s,)),
                                       Part("slots", (k, width)), Part("control", ())]
                   + ([Part("clip_norm", ())] if clip else []))


def round_reduce(n: int, s: int, k: int, width: int, exact: bool, dp: bool = False) -> Message:
    """A round's sum-reduce. ``exact`` (weights known before training): int64 ``delta`` (N,) and
    ``state_change`` (S,) fixed-point sums, then float32 parts two per int64: ``losses`` (K,) |
    ``slots`` (K, W) | ``dropped`` (K,) | with ``dp`` (DP, always exact) ``clipped`` (K,), 1.0
    where that client's update was clipped (| 4 bytes of padding when their count is odd). Otherwise
    float32: ``delta`` (N,) | ``weight`` () | ``loss`` () | ``state_change`` (S,) | ``slots`` (K, W)
    | ``dropped`` (K,). K may be 0 (an empty Poisson cohort): its parts have no elements."""
    if exact:
        clipped = [Part("clipped", (k,))] if dp else []
        return Message("round reduce", [Part("delta", (n,), torch.int64), Part("state_change", (s,), torch.int64),
                                        Part("losses", (k,)), Part("slots", (k, width)), Part("dropped", (k,))]
                       + clipped, torch.int64)
    return Message("round reduce", [Part("delta", (n,)), Part("weight", ()), Part("loss", ()),
                                    Part("state_change", (s,)), Part("slots", (k, width)), Part("dropped", (k,))])


def eval_broadcast(n: int, trained: int, width: int) -> Message:
    """An evaluation's broadcast, float32: ``global`` (N,) evaluated global state | ``personal``
    (T, width) the stored vectors of the T trained clients | ``control`` () GO or STOP."""
    return Message("eval broadcast", [Part("global", (n,)), Part("personal", (trained, width)),
                                      Part("control", ())])


def eval_reduce(num_clients: int, columns: int) -> Message:
    """An evaluation's sum-reduce, float32: ``matrix`` (num_clients, columns) of counts."""
    return Message("eval reduce", [Part("matrix", (num_clients, columns))])


def start_broadcast() -> Message:
    """The run's first broadcast, float32: ``start_round`` () (-1: the server could not start)."""
    return Message("start broadcast", [Part("start_round", ())])
