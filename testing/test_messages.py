"""The message codec (core/messages.py, issue 24): every collective's buffer is declared once as
ordered named parts; a buffer or payload that does not match its declaration fails where it is
built or read, with a line naming the parts, never as a hang inside a collective."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from core.config import validate_config
from core.distributed import DistContext, Transport
from core.evaluation import COLUMNS, eval_messages, eval_width
from core.messages import (GO, STOP, Message, MessageMismatch, Part, eval_broadcast, round_broadcast, round_reduce,
                           start_broadcast)
from core.server import Server
from core.simulation import build_simulation
from core.task import load_task
from core.worker import RoundLayout, run_worker, stopped, train_share

N, S, K, W = 10, 3, 4, 5


def _shares_storage(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``view`` lies inside ``buf``'s memory (a view, not a copy)."""
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    return (view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and start <= view.data_ptr() <= end and view.data_ptr() + view.numel() * view.element_size() <= end)


def test_declared_parts_round_trip_through_one_buffer():
    msg = round_broadcast(N, S, K, W)
    assert msg.numel == N + S + K * W + 1
    values = {"global": torch.randn(N), "server_state": torch.randn(S),
              "slots": [torch.randn(W, dtype=torch.float64) for _ in range(K)], "control": GO}
    buf = msg.build("cpu", values)
    expected = torch.cat([values["global"], values["server_state"], torch.stack(values["slots"]).float().view(-1),
                          torch.tensor([GO])])
    assert torch.equal(buf, expected), "the same bytes torch.cat gave"
    parts = msg.views(buf)
    assert list(parts) == ["global", "server_state", "slots", "control"]
    assert torch.equal(parts["global"], values["global"]) and torch.equal(parts["server_state"], values["server_state"])
    assert parts["slots"].shape == (K, W) and parts["control"].shape == ()
    assert not stopped(msg, buf)
    parts["control"].fill_(STOP)
    assert stopped(msg, buf), "the views write into the buffer"


def test_named_views_are_views_into_one_buffer():
    for msg in (round_broadcast(N, S, K, W), round_reduce(N, S, K, W, exact=True), round_reduce(N, S, K, W, False),
                eval_broadcast(N, 3, W), start_broadcast()):
        buf = msg.zeros("cpu")
        for name, view in msg.views(buf).items():
            assert _shares_storage(view, buf), f"{msg.name}: {name} is not a view"
            view.fill_(1)
        assert buf.count_nonzero() > 0


def test_exact_reduce_packs_float32_parts_two_per_int64_bit_for_bit():
    """The int64 layout of core/worker.py before the codec: delta (N) | state change (S) | float32
    losses (K) | slots (K, W) | dropped (K) viewed from the int64 words after N + S, padded to whole
    int64 words. The codec puts every part at the same bytes (K = 3: an odd count of floats)."""
    K = 3
    msg = round_reduce(N, S, K, W, exact=True)
    floats = K + K * W + K
    assert msg.dtype == torch.int64 and msg.numel == N + S + (floats + 1) // 2
    buf = msg.zeros("cpu")
    parts = msg.views(buf)
    parts["delta"].copy_(torch.arange(N))
    parts["state_change"].copy_(-torch.arange(S))
    special = torch.tensor([float("nan"), -0.0, 1e-45])
    parts["losses"].copy_(special)
    parts["slots"].copy_(torch.randn(K, W))
    parts["dropped"].copy_(torch.tensor([0.0, 1.0, 1.0]))
    old = buf[N + S:].view(torch.float32)  # the layout's float32 region as it was read before
    assert torch.equal(buf[:N], torch.arange(N)) and torch.equal(buf[N:N + S], -torch.arange(S))
    assert torch.equal(old[:K].view(torch.int32), special.view(torch.int32)), "NaN and -0.0 bit for bit"
    assert torch.equal(old[K:K + K * W].view(K, W), parts["slots"])
    assert torch.equal(old[K + K * W:floats], parts["dropped"])
    assert msg.padded and old[floats:].count_nonzero() == 0, "the odd float of padding is zero"


def test_float_reduce_layout_is_the_old_one():
    msg = round_reduce(N, S, K, W, exact=False)
    assert msg.dtype == torch.float32 and msg.numel == N + 2 + S + K * W + K
    buf = torch.arange(msg.numel, dtype=torch.float32)
    parts = msg.views(buf)
    assert float(parts["weight"]) == N and float(parts["loss"]) == N + 1
    assert torch.equal(parts["dropped"], buf[-K:])


def test_a_buffer_of_another_declaration_is_refused_before_any_collective():
    """One side declares an extra part, or a part of another size: the buffer the other side reads
    is refused at once, naming the declared parts."""
    sender = Message("round broadcast", [Part("global", (N,)), Part("extra", (2,)), Part("control", ())])
    receiver = Message("round broadcast", [Part("global", (N,)), Part("control", ())])
    buf = sender.build("cpu", {"global": torch.zeros(N), "extra": torch.zeros(2), "control": GO})
    with pytest.raises(MessageMismatch, match=r"round broadcast: a buffer of \(13,\) torch.float32 does not match "
                                              r"the declaration global \(10,\) \| control \(\) \(11 torch.float32\)"):
        receiver.views(buf)
    with pytest.raises(MessageMismatch, match="does not match"):
        stopped(receiver, buf)
    with pytest.raises(MessageMismatch, match="does not match"):
        round_broadcast(N, S, K, W).views(round_broadcast(N, S, K, W + 1).zeros("cpu"))
    with pytest.raises(MessageMismatch, match="torch.int64 does not match"):
        round_reduce(N, S, K, W, exact=False).views(torch.zeros(round_reduce(N, S, K, W, False).numel,
                                                               dtype=torch.int64))


def test_a_payload_that_misses_or_adds_a_part_or_has_a_wrong_size_is_refused():
    msg = round_broadcast(N, S, K, W)
    good = {"global": torch.zeros(N), "server_state": torch.zeros(S), "slots": [torch.zeros(W)] * K, "control": GO}
    with pytest.raises(MessageMismatch, match=r"missing \['server_state'\], undeclared \['extra'\]"):
        msg.build("cpu", {**{k: v for k, v in good.items() if k != "server_state"}, "extra": torch.zeros(1)})
    with pytest.raises(MessageMismatch, match=r"part 'global' has 9 elements, declared \(10,\)"):
        msg.build("cpu", {**good, "global": torch.zeros(N - 1)})
    with pytest.raises(MessageMismatch, match=r"part 'slots' has 3 rows, declared \(4, 5\)"):
        msg.build("cpu", {**good, "slots": [torch.zeros(W)] * 3})
    with pytest.raises(MessageMismatch, match=r"part 'slots' row 1 has 4 elements"):
        msg.build("cpu", {**good, "slots": [torch.zeros(W), torch.zeros(W - 1)] + [torch.zeros(W)] * 2})
    with pytest.raises(MessageMismatch, match="no part 'weight'"):
        msg.view(msg.zeros("cpu"), "weight")
    with pytest.raises(MessageMismatch, match="declared twice"):
        Message("m", [Part("a", (1,)), Part("a", (2,))])
    with pytest.raises(MessageMismatch, match="cannot be packed"):
        Message("m", [Part("a", (1,), torch.int64)], torch.float32)
    empty = eval_broadcast(N, 3, 0)  # trained clients without personal vectors: no rows to send
    assert empty.build("cpu", {"global": torch.ones(N), "personal": [], "control": GO}).numel() == N + 1


@pytest.fixture(scope="module")
def synthetic_sim():
    config = yaml.safe_load((Path(__file__).parents[1] / "experiments/synthetic/config.yaml").read_text())
    config["strategy"] = "scaffold"
    config["client_config"]["optimizer_config"] = {"type": "sgd", "lr": 0.05}
    cfg = validate_config(config, "test")
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(cfg, load_task("synthetic"), "unused", ctx, Transport(ctx))


def test_both_sides_build_a_round_from_one_declaration(synthetic_sim):
    """RoundLayout, which the server and every worker build, declares the round's messages; a
    broadcast of another size is refused by train_share before any client trains."""
    sim = synthetic_sim
    lay = RoundLayout(sim, 1)
    assert lay.broadcast.numel == lay.n + lay.s + lay.k * lay.width + 1 and lay.s > 0 and lay.c > 0
    assert lay.reduce.dtype == torch.int64
    with pytest.raises(MessageMismatch, match="round broadcast"):
        train_share(sim, 1, torch.zeros(lay.broadcast.numel + 1))
    sent, summed = eval_messages(sim, 2)
    assert sent.numel == lay.n + 2 * eval_width(sim) + 1
    assert summed.view(summed.zeros("cpu"), "matrix").shape == (len(sim.test_clients.sizes), COLUMNS)


class _Recorder:
    """A Transport stand-in: records every collective as (name, numel, dtype). Rank 0's broadcasts
    are kept (``sent``) to be replayed, in order, to another rank (``replay``)."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        self.calls: list[tuple[str, int, torch.dtype]] = []
        self.sent: list[torch.Tensor] = []
        self.replay = iter(replay) if replay is not None else None

    def _record(self, tensor: torch.Tensor, what: str) -> None:
        self.calls.append((what, tensor.numel(), tensor.dtype))

    def broadcast(self, tensor: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        self._record(tensor, what)
        if self.replay is not None:
            return next(self.replay).clone()
        self.sent.append(tensor.clone())
        return tensor

    def reduce_sum(self, tensor: torch.Tensor, what: str = "reduce") -> torch.Tensor:
        self._record(tensor, what)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor, what: str = "all-reduce max") -> torch.Tensor:
        self._record(tensor, what)
        return tensor


@pytest.mark.parametrize("strategy", ["scaffold", "dga"])
def test_server_and_worker_run_one_round_program(tmp_path, strategy):
    """Rank 0 (Server.run) and rank 1 (run_worker) of a 2-rank run issue the same collectives, one
    by one: the same names, sizes and dtypes, rounds and evaluations alike (rank 1 receives rank
    0's broadcasts)."""
    config = yaml.safe_load((Path(__file__).parents[1] / "experiments/synthetic/config.yaml").read_text())
    config["strategy"] = strategy
    config["server_config"].update(max_iteration=4, val_freq=2, ckpt_freq=2)
    cfg = validate_config(config, "test")
    sims = []
    for rank, transport in ((0, _Recorder()), (1, None)):
        ctx = DistContext(rank, 2, torch.device("cpu"), "gloo")
        transport = transport if transport is not None else _Recorder(sims[0].transport.sent)
        sims.append(build_simulation(cfg, load_task("synthetic"), "unused", ctx, transport))
        if rank == 0:
            Server(sims[0], tmp_path, None).run()
        else:
            run_worker(sims[1])
    leader, worker = (sim.transport.calls for sim in sims)
    assert leader == worker
    names = [what for what, _, _ in leader]
    assert names[:2] == ["start broadcast", "round 1 broadcast"] and "round 4 reduce" in names
    assert ("round 2 eval reduce", len(sims[0].test_clients.sizes) * COLUMNS, torch.float32) in leader
