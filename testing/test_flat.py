"""StateLayout: a module's parameters and buffers as one float32 vector, loaded in place."""
from __future__ import annotations

import torch
from torch import nn

from core.flat import StateLayout


def test_load_is_exact_and_integer_buffers_round_to_the_nearest_count():
    """A server average of equal counts with non-integer weights (DGA) lands a hair below the count
    (4.9999995); loading it must give 5, not 4."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    layout = StateLayout(model)
    flat = torch.randn(layout.numel)
    count = layout.numel - 1  # num_batches_tracked, the last buffer
    assert layout.names[-1].endswith("num_batches_tracked")
    flat[count] = 4.9999995
    layout.load_(flat)
    assert int(model[1].num_batches_tracked) == 5
    flat[count] = 5.0
    assert torch.equal(layout.flatten(), flat), "everything else loads exactly"
