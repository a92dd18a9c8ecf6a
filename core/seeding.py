"""Seeds derived from (seed, round, client id), so no result depends on a process-wide RNG stream."""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer ``keys`` (via numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def run_draw_seed(seed: int, round_idx: int, stream: int) -> int:
    """The seed of a draw made for the whole run in round ``round_idx`` (the server's DP noise, say),
    told apart by ``stream`` > 0: five keys (seed, round, stream, 0, stream), a length no
    :func:`client_generator` key has, so no client's training generator is seeded alike whatever
    its id (a three-key (seed, round, stream) would equal client ``stream``'s)."""
    return derive_seed(seed, round_idx, stream, 0, stream)


def client_generator(device: torch.device, seed: int, round_idx: int, client_id: int,
                     stream: int = 0) -> torch.Generator:
    """A torch Generator on ``device`` for one client's training in one round (``stream`` tells
    apart other uses in the same round, e.g. fine-tuning before evaluation).

    Also seeds torch's default generators of the CPU and of ``device`` with the same value, so
    randomness inside the model (dropout) is a function of (seed, round, client) too.
    """
    value = derive_seed(seed, round_idx, client_id, stream) if stream else derive_seed(seed, round_idx, client_id)
    seed_default_generators(device, value)
    return torch.Generator(device=device).manual_seed(value)


def seed_default_generators(device: torch.device, value: int) -> None:
    """Seed the CPU default generator and, for a CUDA ``device``, that device's default generator.

    Unlike ``torch.manual_seed`` this does not queue a lazy seeding call for every CUDA device, which
    formats a stack trace each time when CUDA is not initialised (about 0.6 ms per call, once per
    client on a CPU run).
    """
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)
