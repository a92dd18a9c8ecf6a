"""Per-client state that never leaves the client: personal layers, strategy state, personal models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import overload

import numpy as np
import torch


class ClientStore:
    """Maps client id -> (W,) float32 CPU vector (a client's personal state; W is fixed per run).

    Lives with the server; only clients that have trained at least once have an entry. Rows live in
    one table of ``capacity x W`` floats that doubles when full. It stays in host memory while it is
    at most ``memory_limit_bytes``; past that it moves to a memory-mapped file ``spill_path``
    (DESIGN invariant 2), so the operating system pages rows in and out and host memory stays
    bounded however many clients train. Growing the file keeps every row where it is (no copy).

    Vectors returned by :meth:`get` are views of the table: read them, do not modify them.
    """

    def __init__(self, spill_path: Path | None = None, memory_limit_bytes: float = float("inf")):
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self.memory_limit_bytes = memory_limit_bytes
        self._row: dict[int, int] = {}
        self._table: torch.Tensor | None = None
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, client_id: int) -> bool:
        return int(client_id) in self._row

    @property
    def on_disk(self) -> bool:
        """True once the table has moved to the memory-mapped spill file."""
        return self._map is not None

    @overload
    def get(self, client_id: int, default: torch.Tensor) -> torch.Tensor: ...

    @overload
    def get(self, client_id: int, default: None) -> torch.Tensor | None: ...

    def get(self, client_id, default):
        """The client's (W,) vector, or ``default`` when it has none."""
        row = self._row.get(int(client_id))
        if row is None:
            return default
        assert self._table is not None  # a row exists only in a table
        return self._table[row]

    def __getitem__(self, client_id: int) -> torch.Tensor:
        """The client's (W,) vector. Raises KeyError when the client has none."""
        vector = self.get(client_id, None)
        if vector is None:
            raise KeyError(f"client {client_id} has no row in the client store")
        return vector

    def put(self, client_id: int, value: torch.Tensor) -> None:
        """Store a copy of the (W,) ``value`` (any device) as the client's vector."""
        value = value.detach().reshape(-1)
        if self._table is not None and self._table.shape[1] != value.numel():
            raise ValueError(f"client store holds vectors of {self._table.shape[1]} floats, got {value.numel()}")
        cid = int(client_id)
        if cid not in self._row:
            self._reserve(len(self._row) + 1, value.numel())
            self._row[cid] = len(self._row)
        assert self._table is not None  # reserved above
        self._table[self._row[cid]].copy_(value)

    def _reserve(self, rows: int, width: int) -> None:
        capacity = 0 if self._table is None else self._table.shape[0]
        if rows <= capacity:
            return
        capacity = max(rows, 2 * capacity, 16)
        if self.spill_path is not None and capacity * width * 4 > self.memory_limit_bytes:
            self._grow_on_disk(capacity, width)
        else:
            table = torch.zeros(capacity, width)
            if self._table is not None:
                table[:len(self._row)] = self._table[:len(self._row)]
            self._table = table

    def _grow_on_disk(self, capacity: int, width: int) -> None:
        """Map a file of ``capacity`` rows; rows already in memory are written to it once."""
        was_on_disk, old = self.on_disk, self._table
        assert self.spill_path is not None  # only a store with a spill file grows on disk
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        if not was_on_disk:
            open(self.spill_path, "wb").close()
        os.truncate(self.spill_path, capacity * width * 4)
        self._map = np.memmap(self.spill_path, dtype=np.float32, mode="r+", shape=(capacity, width))
        self._table = torch.from_numpy(self._map)
        if not was_on_disk and old is not None:
            self._table[:len(self._row)] = old[:len(self._row)]

    def state_dict(self) -> dict:
        """``{"entries": {client id: (W,) vector}}``: views, without a copy, of one storage that spans
        only the rows in use (``len(self) x W`` floats), so that ``torch.save`` writes those rows and
        not the whole table (whose capacity runs up to twice the rows, or 16 rows for one client).
        The views follow later :meth:`put` calls: save them before the store changes."""
        if self._table is None:
            return {"entries": {}}
        used = (self._map if self._map is not None else self._table.numpy())[:len(self._row)]
        rows = torch.from_numpy(used)  # a storage of exactly these rows (a slice of the table's memory)
        return {"entries": {cid: rows[row] for cid, row in self._row.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Replace the content by ``state["entries"]`` (from :meth:`state_dict`; checkpoints written
        before it saved only the rows in use hold the same form)."""
        self.close()
        for cid, vec in state["entries"].items():
            self.put(cid, vec)

    def close(self) -> None:
        """Empty the store and delete its spill file (checkpoints keep what must persist)."""
        self._row, self._table, self._map = {}, None, None
        if self.spill_path is not None:
            self.spill_path.unlink(missing_ok=True)


class StoreRow:
    """The layout of a client-store row (and of a round slot), from the algorithms' declarations:
    the client's personal layers (P floats), then the strategy's named client state (C), then the
    personalization method's named separate model state (M).

    ``strategy_parts`` / ``model_parts`` are :class:`core.local_run.StateParts`; ``eval_part`` names
    what evaluation reads of a row (``personal``: the personal layers; ``model``: the model state).
    """

    def __init__(self, personal_numel: int, strategy_parts, model_parts, eval_part: str = "personal"):
        self.strategy_parts, self.model_parts, self.eval_part = strategy_parts, model_parts, eval_part
        self.p, self.c, self.m = personal_numel, strategy_parts.numel, model_parts.numel
        self.width = self.p + self.c + self.m

    def personal(self, row: torch.Tensor) -> torch.Tensor:
        """(P,) view of a row's personal layers."""
        return row[:self.p]

    def strategy_state(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of a row's strategy client state (empty without one)."""
        return self.strategy_parts.views(row[self.p:self.p + self.c]) if self.c else {}

    def model_state(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of a row's separate model state (empty without one)."""
        return self.model_parts.views(row[self.p + self.c:]) if self.m else {}

    @property
    def eval_width(self) -> int:
        """Floats evaluation reads of a row (:meth:`eval_vector`)."""
        return self.m if self.eval_part == "model" else self.p

    def eval_vector(self, row: torch.Tensor | None) -> torch.Tensor | None:
        """What evaluation reads of a row: its model state or its personal layers (None: no row)."""
        if row is None:
            return None
        return row[self.p + self.c:] if self.eval_part == "model" else row[:self.p]
