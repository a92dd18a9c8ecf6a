"""The order-independent sum (issue 23): fixed-point int64 terms give the same bits for any split of
the cohort over ranks and any order, and 1, 2 and 3 processes train bit-identical runs.

Before it, the float32 sum made 1 and 3 processes differ by about 3e-8 after one round of the CPU
CIFAR-10 config, and training amplified that to 0.09 after round 2.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import e2e_trainer
from core.exact import FRACTION_BITS, MAGIC, RANGE, FixedPointSums, decode, state_change_bits
from testing.conftest import REPO, failure_text, load_ckpt, read_metrics, run_trainer

K, N = 7, 5000
MODES = ("host", "sync_free", "rows", "rows_sync_free")
UNIT = 2.0 ** -FRACTION_BITS


def _clients(seed: int = 0):
    """K float32 deltas of mixed scales (1e-6 to 10, a few exact ties of the rounding) and sample
    weights, with their shares p_i = w_i / sum(w) as RoundLayout computes them."""
    gen = torch.Generator().manual_seed(seed)
    scales = 10.0 ** torch.randint(-6, 2, (K, N), generator=gen).float()
    deltas = (torch.randn(K, N, generator=gen) * scales).float()
    weights = torch.randint(1, 500, (K,), generator=gen).double()
    shares = (weights / math.fsum(weights.tolist())).tolist()
    deltas[0, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]).double().div(shares[0] * 2.0 ** FRACTION_BITS).float()
    return deltas, shares


def _rank_sum(deltas, shares, clients, mode: str) -> torch.Tensor:
    """One rank's int64 delta sum over ``clients`` (in that order): one client at a time (``host``:
    the CPU path that reads the range check on the host; ``sync_free``: the device path), or as
    vectorized rows (``rows``, ``rows_sync_free``)."""
    acc = torch.zeros(deltas.shape[1], dtype=torch.int64)
    fixed = FixedPointSums(acc, torch.zeros(0, dtype=torch.int64), K, sync_free=mode.endswith("sync_free"))
    if mode.startswith("rows") and clients:
        ok = fixed.add_rows_(deltas[clients], torch.ones(len(clients), dtype=torch.bool),
                             torch.tensor([shares[c] for c in clients], dtype=torch.float64))
        assert ok.all()
        return acc
    for c in clients:
        fixed.delta.copy_(deltas[c])
        assert bool(fixed.add_(torch.tensor(True), shares[c]))
    return acc


def test_any_split_and_order_gives_the_same_int64_sum_within_the_resolution_of_float64():
    deltas, shares = _clients()
    rng = random.Random(0)
    sums = []
    for ranks in (1, 2, 3, 5):
        for mode in MODES:
            order = list(range(K))
            rng.shuffle(order)
            splits = [order[r::ranks] for r in range(ranks)]
            sums.append(sum(_rank_sum(deltas, shares, part, mode) for part in splits))  # the reduce: int64 sum
    assert all(torch.equal(s, sums[0]) for s in sums[1:])
    reference = sum(p * d.double() for p, d in zip(shares, deltas))
    error = float((decode(sums[0]) - reference).abs().max())
    assert error <= K * 0.5 * UNIT + 1e-15 * float(reference.abs().max()), error
    # the float32 sum it replaces does depend on the order
    orders = [sorted(range(K), key=lambda c: (c * 3 + s) % K) for s in range(K)]
    floats = [sum((shares[c] * deltas[c] for c in order), torch.zeros(N)) for order in orders]
    assert any(not torch.equal(f, floats[0]) for f in floats[1:])


def test_the_magic_rounding_is_torchs_rounding():
    """The CPU fast path (one float64 addition of MAGIC) and the general path (torch.round and a
    conversion) give the same integers, ties to even, up to the fast path's bound of 2**51 units."""
    values = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49999, -7.5000001, 0.0, -0.0,
                           2.0 ** 51 - 1.5, -(2.0 ** 51 - 2.5), 2.0 ** 30 + 0.5], dtype=torch.float64)
    values = torch.cat([values, torch.randn(10000, dtype=torch.float64) * 2.0 ** 40])
    assert float(values.abs().max()) < 2.0 ** 51
    fast = (values + MAGIC).view(torch.int64) - int(torch.tensor(MAGIC, dtype=torch.float64).view(torch.int64))
    assert torch.equal(fast, values.round().long())
    # through FixedPointSums: a share that puts the largest term just below and just above 2**51 units
    x = torch.tensor([1000.0, -2049.0, 0.3, -1e-9]).float()
    for share in (0.999, 1.0):  # 2049 * 2**40 * share: below / above 2**51 = 2048 * 2**40
        fast_or_not = [_rank_sum(x.view(1, -1), [share], [0], m) for m in MODES]
        expected = (x.double() * (share * 2.0 ** FRACTION_BITS)).round().long()
        assert all(torch.equal(s, expected) for s in fast_or_not)


@pytest.mark.parametrize("mode", ["host", "sync_free"])
def test_out_of_range_and_non_finite_clients_are_refused_not_summed(mode):
    acc, state = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    fixed = FixedPointSums(acc, state, 3, sync_free=mode == "sync_free")
    ok = torch.tensor(True)
    top = RANGE - 0.5  # the largest float32 below RANGE
    assert float(torch.tensor(top).float()) == top
    fixed.delta.copy_(torch.tensor([top, -top, 1.0, 0.0]))
    assert bool(fixed.add_(ok, 1.0, torch.tensor([top, -top, 2.0, 0.0])))
    assert decode(acc).tolist() == [top, -top, 1.0, 0.0], "the largest entries fit"
    assert decode(state, state_change_bits(3)).tolist() == [top, -top, 2.0, 0.0]
    before = (acc.clone(), state.clone())
    for delta, change in [([RANGE, 0, 0, 0], [0] * 4), ([0, -RANGE, 0, 0], [0] * 4), ([0, 0, 1e30, 0], [0] * 4),
                          ([math.nan, 0, 0, 0], [0] * 4), ([0, math.inf, 0, 0], [0] * 4),
                          ([1.0, 0, 0, 0], [0, 0, RANGE, 0]), ([1.0, 0, 0, 0], [0, math.nan, 0, 0])]:
        fixed.delta.copy_(torch.tensor(delta))
        assert not bool(fixed.add_(ok, 0.5, torch.tensor(change, dtype=torch.float32))), (delta, change)
        assert torch.equal(acc, before[0]) and torch.equal(state, before[1]), "both sums untouched"
    fixed.delta.copy_(torch.tensor([1.0, 0, 0, 0]))
    assert not bool(fixed.add_(torch.tensor(False), 0.5)), "a client dropped already stays dropped"
    assert torch.equal(acc, before[0])
    rows = torch.tensor([[1.0, 2.0], [RANGE, 0.0], [math.nan, 0.0], [3.0, 4.0]])
    acc2 = torch.zeros(2, dtype=torch.int64)
    kept = FixedPointSums(acc2, torch.zeros(0, dtype=torch.int64), 4, sync_free=mode == "sync_free").add_rows_(
        rows, torch.tensor([True, True, True, False]), torch.full((4,), 0.25, dtype=torch.float64))
    assert kept.tolist() == [True, False, False, False]
    assert decode(acc2).tolist() == [0.25, 0.5]


def test_finite_updates_beyond_the_range_are_dropped_and_named(tmp_path, capsys):
    """Clients whose updates are finite (about 1e30) but beyond 2**22: every one is dropped, and the
    run stops with one line saying so, not with an overflowed sum."""
    code = e2e_trainer.main(["-dataPath", "unused", "-outputPath", str(tmp_path), "-config",
                             "experiments/synthetic/config.yaml", "-task", str(REPO / "testing/tasks/faulty_task"),
                             "-run_name", "r", "--set", "model_config.model_type=OutOfRangeMLP"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, lines
    assert "round 1: the updates of all 5 clients of the round were not finite (NaN or inf) or beyond the " \
           "exact sum's range (an entry of 4194304 or more)" in lines[0]


# ---- end to end: 1, 2 and 3 processes -------------------------------------------------------------

SYNTHETIC = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic",
             "--set", "server_config.max_iteration=10", "--set", "server_config.val_freq=5",
             "--set", "client_config.optimizer_config.momentum=0.9"]
CASES = {  # each with the synthetic config's FedPer head unless the case says otherwise
    "fedavg_fedper_cohort_2_to_6": ["server_config.num_clients_per_iteration='2,6'"],
    "scaffold_fedper": ["strategy=scaffold"],
    "fedprox_uniform_ditto_fedyogi": ["strategy=fedprox", "strategy_config.client_weighting=uniform",
                                      "personalization.method=ditto", "personalization.local_layers=[]",
                                      "server_config.optimizer_config.type=yogi",
                                      "server_config.optimizer_config.lr=0.01"],
}


def assert_bit_identical(a: dict, b: dict) -> None:
    """Two checkpoints hold the same global model, server strategy and optimizer state and client
    store, bit for bit."""
    assert a["round"] == b["round"]
    gap = float((a["global"] - b["global"]).abs().max())
    assert torch.equal(a["global"], b["global"]), f"global models differ by up to {gap:.3g}"
    assert torch.equal(a["strategy_state"], b["strategy_state"])
    moments_a, moments_b = a["server_optimizer"]["state"], b["server_optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    for slot, tensors in moments_a.items():
        for name, value in tensors.items():
            assert torch.equal(value, moments_b[slot][name]), (slot, name)
    store_a, store_b = a["client_store"]["entries"], b["client_store"]["entries"]
    assert store_a.keys() == store_b.keys() and len(store_a) > 0
    for cid, vec in store_a.items():
        assert torch.equal(vec, store_b[cid]), cid


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_two_and_three_processes_train_bit_identical_runs(tmp_path, case):
    args = SYNTHETIC + ["-outputPath", str(tmp_path)] + [a for item in CASES[case] for a in ("--set", item)]
    for nproc in (1, 2, 3):
        proc = run_trainer(args + ["-run_name", f"p{nproc}"] + (["-backend", "gloo"] if nproc > 1 else []), nproc=nproc)
        assert proc.returncode == 0, failure_text(proc)
    one = load_ckpt(tmp_path / "p1")
    assert one["round"] == 10
    if case.startswith("scaffold"):
        assert one["strategy_state"].abs().max() > 0, "SCAFFOLD's server control moved"
    for nproc in (2, 3):
        assert_bit_identical(one, load_ckpt(tmp_path / f"p{nproc}"))
        losses = [[r["train_loss"], r["global_test_acc"]] for r in read_metrics(tmp_path / f"p{nproc}")]
        assert losses == [[r["train_loss"], r["global_test_acc"]] for r in read_metrics(tmp_path / "p1")]


def test_cifar10_one_and_three_processes_bit_identical(tmp_path, cifar_path):
    """The CPU CIFAR-10 config (SmallCNN, FedPer, momentum, weight decay, augmentation), 4 rounds of
    4 clients of about 1,000 images."""
    args = ["-dataPath", str(cifar_path), "-outputPath", str(tmp_path), "-config", "experiments/cv/config_cpu.yaml",
            "-task", "cv"]
    for item in ["server_config.max_iteration=4", "server_config.num_clients_per_iteration=4",
                 "server_config.val_freq=4", "server_config.ckpt_freq=4", "client_config.local_epochs=1",
                 "data_config.num_clients=50"]:
        args += ["--set", item]
    for nproc in (1, 3):
        proc = run_trainer(args + ["-run_name", f"p{nproc}"] + (["-backend", "gloo"] if nproc > 1 else []), nproc=nproc)
        assert proc.returncode == 0, failure_text(proc)
    one, three = load_ckpt(tmp_path / "p1"), load_ckpt(tmp_path / "p3")
    assert one["round"] == 4
    assert_bit_identical(one, three)
