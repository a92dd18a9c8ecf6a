"""The overhead benchmark's breakdown clocks the loops the engine really runs, and leaves them as they were."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks.common import single_process_simulation
from benchmarks.overhead import outside_steps
from core.server import Server

SMALL = ["server_config.num_clients_per_iteration=3"]  # of 1,000 clients of 50 random images


@pytest.mark.parametrize("vectorize, clocked", [(False, "ClientTrainer._epochs"),
                                                (True, "VectorizedTrainer.train_group")])
def test_breakdown_clocks_the_client_loops_and_puts_them_back(vectorize, clocked):
    overrides = SMALL + [f"client_config.vectorize={str(vectorize).lower()}"]
    _, sim = single_process_simulation("benchmarks/configs/pfl_cnn_50x50.yaml", "synthetic", "cpu", overrides)
    trainer = sim.vectorized if vectorize else sim.trainer
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(sim, Path(tmp), None)
        before = server.global_flat.clone()
        result = outside_steps(server, sim, range(1, 3))
        server.close()
    assert result["clocked"] == clocked and result["rounds"] == [1, 2]
    for total, steps in zip(result["round_s"], result["steps_s"]):
        assert 0 < steps < total, "the clocked loops run inside the round and are not all of it"
    assert 0 < result["outside_steps_share_median"] < 1
    assert not (server.global_flat == before).all(), "the diagnostic rounds are real rounds: they train"
    assert clocked.split(".")[1] not in vars(trainer), "the clock is removed from the trainer afterwards"
