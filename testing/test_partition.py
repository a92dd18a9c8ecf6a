"""Partitioners on the real CIFAR-10 labels: counts, coverage, proportions, determinism, errors."""
from __future__ import annotations

import numpy as np
import pytest

from core import partition as P
from core.errors import UserError
from experiments.cv.dataloaders.cifar10 import read_batches


@pytest.fixture(scope="module")
def labels(cifar_path):
    return read_batches(cifar_path, "train", download=False)[1].numpy(), \
        read_batches(cifar_path, "test", download=False)[1].numpy()


def _coverage(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == n and len(np.unique(flat)) == n, "every sample belongs to exactly one client"


@pytest.mark.parametrize("method,kw", [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"classes_per_client": 2}),
                                       ("label_quantity", {"classes_per_client": 2}),
                                       ("dirichlet_capped", {"alpha": 0.5})])
def test_train_and_test_splits_cover_each_sample_once(labels, method, kw):
    split = P.partition(labels[0], labels[1], method, 100, seed=0, min_samples=10, **kw)
    assert split.num_clients == 100
    _coverage(split.train, 50_000)
    _coverage(split.test, 10_000)
    assert min(len(p) for p in split.train) >= 10


@pytest.mark.parametrize("method,kw", [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"classes_per_client": 2}),
                                       ("label_quantity", {"classes_per_client": 2}),
                                       ("dirichlet_capped", {"alpha": 0.5})])
def test_partition_is_a_function_of_the_seed(labels, method, kw):
    def train_parts(seed):
        return P.partition(labels[0], labels[1], method, 100, seed=seed, min_samples=10, **kw).train
    first, again, other = train_parts(0), train_parts(0), train_parts(1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other)), "another seed, another split"


def test_iid_sizes_differ_by_at_most_one(labels):
    sizes = [len(p) for p in P.iid(labels[0], 7, seed=1)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 50_000


def test_shards_give_at_most_k_classes(labels):
    parts = P.shards(labels[0], 100, 2, seed=0)
    assert all(len(np.unique(labels[0][p])) <= 2 for p in parts)
    assert sum(len(np.unique(labels[0][p])) == 2 for p in parts) > 80


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    def mean_max_share(alpha):
        parts = P.dirichlet(labels[0], 50, alpha, seed=0)
        return np.mean([np.bincount(labels[0][p], minlength=10).max() / len(p) for p in parts])
    assert mean_max_share(0.1) > mean_max_share(1.0) > mean_max_share(100.0)
    assert mean_max_share(100.0) < 0.2


def test_local_test_split_matches_train_proportions(labels):
    split = P.partition(labels[0], labels[1], "dirichlet", 20, seed=4, alpha=0.3)
    for tr, te in zip(split.train, split.test):
        p_train = np.bincount(labels[0][tr], minlength=10) / len(tr)
        p_test = np.bincount(labels[1][te], minlength=10) / len(te)
        # test share is 1/5 of train share, rounded to whole samples per class
        assert np.abs(p_train - p_test).max() < 0.03
        assert len(te) == pytest.approx(len(tr) / 5, abs=10)


def test_same_seed_same_split_other_seed_other_split(labels):
    a = P.partition(labels[0], labels[1], "dirichlet", 50, seed=7, alpha=0.5)
    b = P.partition(labels[0], labels[1], "dirichlet", 50, seed=7, alpha=0.5)
    c = P.partition(labels[0], labels[1], "dirichlet", 50, seed=8, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.test, b.train + b.test))
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))


@pytest.mark.timeout(120)  # a guard against redraw loops, not a speed test (see benchmarks/)
def test_ten_thousand_clients_alpha_0_1_terminates_above_minimum(labels):
    split = P.partition(labels[0], labels[1], "dirichlet", 10_000, seed=0, alpha=0.1, min_samples=4)
    assert min(len(p) for p in split.train) >= 4
    _coverage(split.train, 50_000)
    _coverage(split.test, 10_000)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards", "label_quantity", "dirichlet_capped"])
def test_impossible_minimum_is_a_user_error(labels, method):
    with pytest.raises(UserError, match="min_samples"):
        P.partition(labels[0], labels[1], method, 1000, seed=0, min_samples=60)


def test_label_quantity_gives_exactly_k_classes_split_equally(labels):
    parts = P.label_quantity(labels[0], 10, 2, seed=42)
    held = [set(np.unique(labels[0][p]).tolist()) for p in parts]
    assert all(len(h) == 2 and i % 10 in h for i, h in enumerate(held)), "class i mod 10 plus one other"
    for cls in range(10):
        holders = [len(np.flatnonzero(labels[0][p] == cls)) for p, h in zip(parts, held) if cls in h]
        assert holders and max(holders) - min(holders) <= 1, "a class is split equally among its holders"
    with pytest.raises(UserError, match="classes_per_client"):
        P.label_quantity(labels[0], 10, 11, seed=0)
    with pytest.raises(UserError, match=r"label_quantity gives classes \[\d.*\] to no client \(4 clients x 2"):
        P.label_quantity(labels[0], 4, 2, seed=0)  # 8 class slots for 10 classes: the test set could not be matched


def test_apportion_is_exact_and_proportional():
    rng = np.random.default_rng(0)
    counts = P.apportion(1000, np.array([1.0, 2.0, 7.0]), rng)
    assert counts.tolist() == [100, 200, 700]
    odd = P.apportion(10, np.array([1.0, 1.0, 1.0]), rng)
    assert odd.sum() == 10 and sorted(odd.tolist()) == [3, 3, 4]


def test_capped_dirichlet_gives_no_class_to_clients_already_full(labels):
    parts = P.dirichlet_capped(labels[0], 10, 0.5, seed=42)
    counts = np.stack([np.bincount(labels[0][p], minlength=10) for p in parts])
    before = np.cumsum(counts, axis=1) - counts  # samples each client held when class c was dealt
    full = before >= 50_000 / 10
    assert full.any(), "with alpha 0.5 some clients fill up before the last class"
    assert (counts[full] == 0).all()
    assert not np.array_equal(counts, np.stack([np.bincount(labels[0][p], minlength=10)
                                                for p in P.dirichlet(labels[0], 10, 0.5, seed=42)]))
