"""Per-client state that never leaves the client: personal-layer parameters."""
from __future__ import annotations

import torch


class ClientStore:
    """Maps client id -> (P,) float32 CPU tensor of that client's personal parameters.

    Lives with the server; only clients that have trained at least once have an entry. Memory is
    ``4 * P`` bytes per trained client.
    """

    def __init__(self):
        self._entries: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, client_id: int) -> bool:
        return int(client_id) in self._entries

    def get(self, client_id: int, default: torch.Tensor) -> torch.Tensor:
        return self._entries.get(int(client_id), default)

    def put(self, client_id: int, value: torch.Tensor) -> None:
        self._entries[int(client_id)] = value.detach().to("cpu", torch.float32).clone()

    def state_dict(self) -> dict:
        return {"entries": dict(self._entries)}

    def load_state_dict(self, state: dict) -> None:
        self._entries = dict(state["entries"])
