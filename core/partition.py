"""Split a labelled data set into clients: IID, Dirichlet(alpha) over labels, label shards, or a
fixed number of classes per client (label quantity).

Every partitioner returns, per client, the indices of its train samples, and
:func:`matched_test_split` gives each client a local test split with the same label proportions,
the splits together covering the test set exactly once. All functions are pure functions of their
inputs and ``seed``; none loops until a random draw happens to satisfy a constraint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.errors import UserError


@dataclass(frozen=True)
class ClientSplit:
    """``train[i]`` and ``test[i]``: int64 index arrays of client ``i`` into the train/test sets.

    ``val[i]`` (optional): client ``i``'s validation rows of the train set, disjoint from
    ``train[i]``, for a task that holds out its own validation (e.g. the end of a text, where random
    rows would overlap their neighbours in training); the engine then uses them instead of carving
    ``data_config.val_fraction`` at random.
    """

    train: list[np.ndarray]
    test: list[np.ndarray]
    val: Optional[list[np.ndarray]] = None

    @property
    def num_clients(self) -> int:
        return len(self.train)


def _check_feasible(num_samples: int, num_clients: int, min_samples: int) -> None:
    if num_clients * min_samples > num_samples:
        raise UserError(
            f"data_config: {num_clients} clients x min_samples {min_samples} = {num_clients * min_samples} "
            f"exceeds the {num_samples} train samples; lower data_config.num_clients or data_config.min_samples")


def apportion(total: int, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainder).

    ``weights`` has shape (..., n) and is normalised along the last axis; ``total`` applies to each
    row. Ties among remainders are broken at random with ``rng``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    share = weights / weights.sum(axis=-1, keepdims=True) * total
    counts = np.floor(share).astype(np.int64)
    missing = total - counts.sum(axis=-1)
    order = np.argsort(-(share - counts) + rng.random(share.shape) * 1e-9, axis=-1)
    ranks = np.argsort(order, axis=-1)
    counts += ranks < np.expand_dims(missing, -1)
    return counts


def _top_up(counts: np.ndarray, min_samples: int) -> np.ndarray:
    """Move samples from the largest clients to those under ``min_samples``.

    ``counts`` is (clients, classes). A recipient takes from the donor's most plentiful class, so the
    donors' label skew is kept as far as possible. Runs in O(deficit * log clients).
    """
    import heapq

    totals = counts.sum(axis=1)
    donors = [(-int(t), int(i)) for i, t in enumerate(totals) if t > min_samples]
    heapq.heapify(donors)
    for client in np.flatnonzero(totals < min_samples):
        need = min_samples - int(totals[client])
        while need > 0:
            neg_total, donor = heapq.heappop(donors)
            spare = -neg_total - min_samples
            take = min(need, spare)
            for _ in range(take):
                cls = int(np.argmax(counts[donor]))
                counts[donor, cls] -= 1
                counts[client, cls] += 1
            need -= take
            if spare - take > 0:
                heapq.heappush(donors, (neg_total + take, donor))
        totals[client] = min_samples
    return counts


def _indices_from_counts(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal each class's shuffled sample indices to clients by ``counts[client, class]``."""
    per_client: list[list[np.ndarray]] = [[] for _ in range(counts.shape[0])]
    for cls in range(counts.shape[1]):
        pool = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.concatenate([[0], np.cumsum(counts[:, cls])])
        for client in np.flatnonzero(counts[:, cls]):
            per_client[client].append(pool[bounds[client]:bounds[client + 1]])
    return [np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64) for parts in per_client]


def _label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    client_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    flat = labels[np.concatenate(parts)] if parts else np.zeros(0, np.int64)
    return np.bincount(client_of * num_classes + flat, minlength=len(parts) * num_classes).reshape(len(parts), -1)


def iid(labels: np.ndarray, num_clients: int, seed: int, min_samples: int = 1) -> list[np.ndarray]:
    """Uniformly random, near-equal-size split (sizes differ by at most one sample)."""
    _check_feasible(len(labels), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_samples: int = 1) -> list[np.ndarray]:
    """Dirichlet label skew: each class is spread over clients by proportions ~ Dir(alpha).

    As in Yurochkin et al. 2019 (arXiv:1905.12022) and Wang et al. 2020 (FedMA, arXiv:2002.06440);
    smaller ``alpha`` means more skew. Clients left under ``min_samples`` are topped up from the
    largest clients instead of redrawing, so it always terminates (10,000 clients in about a second).

    Raises:
        UserError: if ``num_clients * min_samples`` exceeds the number of samples.
    """
    _check_feasible(len(labels), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    class_sizes = np.bincount(labels, minlength=num_classes)
    gammas = rng.gamma(alpha, size=(num_classes, num_clients)) + 1e-300
    counts = np.stack([apportion(int(class_sizes[c]), gammas[c], rng) for c in range(num_classes)], axis=1)
    counts = _top_up(counts, min_samples)
    return _indices_from_counts(labels, counts, rng)


def dirichlet_capped(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                     min_samples: int = 1) -> list[np.ndarray]:
    """NIID-Bench's Dirichlet label skew (Li et al. 2021, arXiv:2102.02079), as Flower's niid_bench uses.

    Classes are dealt in order 0..C-1; each draws proportions ~ Dir(alpha) over the clients, but a
    client that already holds ``N / num_clients`` samples gets no share of it. The cap keeps sizes
    closer together and, since late classes go to the clients still small, tends to leave more label
    skew than :func:`dirichlet` at the same alpha (CIFAR-10, 10 clients, alpha 0.5, seeds 42, 0, 1:
    mean largest-class share per client 0.41, 0.34, 0.40 against 0.35, 0.28, 0.43). Clients under
    ``min_samples`` are topped up instead of redrawing the whole split.

    Raises:
        UserError: if ``num_clients * min_samples`` exceeds the number of samples.
    """
    _check_feasible(len(labels), num_clients, min_samples)
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    class_sizes = np.bincount(labels, minlength=num_classes)
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    for cls in range(num_classes):
        weights = rng.gamma(alpha, size=num_clients) * (counts.sum(axis=1) < len(labels) / num_clients)
        counts[:, cls] = apportion(int(class_sizes[cls]), weights + 1e-300, rng)
    return _indices_from_counts(labels, _top_up(counts, min_samples), rng)


def shards(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int,
           min_samples: int = 1) -> list[np.ndarray]:
    """Pathological label skew of McMahan et al. 2017 (FedAvg, arXiv:1602.05629).

    Samples sorted by label are cut into ``num_clients * classes_per_client`` equal shards and each
    client gets ``classes_per_client`` random shards, so it sees at most that many classes (fewer
    when two of its shards share a class, one more when a shard straddles a class boundary).

    Raises:
        UserError: if a client would get fewer than ``min_samples`` samples.
    """
    num_shards = num_clients * classes_per_client
    if len(labels) // num_shards < 1 or (len(labels) // num_shards) * classes_per_client < min_samples:
        raise UserError(
            f"data_config: {num_clients} clients x {classes_per_client} shards leave under min_samples "
            f"{min_samples} samples per client; lower data_config.num_clients or data_config.classes_per_client")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels * len(labels) + rng.permutation(len(labels)), kind="stable")
    pieces = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in owner]


def label_quantity(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int,
                   min_samples: int = 1) -> list[np.ndarray]:
    """Quantity-based label skew "#C = k" of NIID-Bench (Li et al. 2021, arXiv:2102.02079).

    Client ``i`` holds class ``i mod C`` and ``classes_per_client - 1`` other classes drawn at random
    without repetition; each class's samples are split equally among the clients that hold it.

    Raises:
        UserError: ``classes_per_client`` exceeds the number of classes, a class would have no client
            (possible only with fewer clients than classes: its test samples would have no client
            whose label mix includes it), or a client would get fewer than ``min_samples`` samples.
    """
    num_classes = int(labels.max()) + 1
    if classes_per_client > num_classes:
        raise UserError(f"data_config.classes_per_client: {classes_per_client} exceeds the {num_classes} classes")
    rng = np.random.default_rng(seed)
    owned = np.zeros((num_clients, num_classes), dtype=bool)
    for client in range(num_clients):
        first = client % num_classes
        others = rng.choice(np.delete(np.arange(num_classes), first), classes_per_client - 1, replace=False)
        owned[client, [first, *others]] = True
    orphans = np.flatnonzero(~owned.any(axis=0))
    if orphans.size:
        raise UserError(f"data_config: label_quantity gives classes {orphans.tolist()} to no client "
                        f"({num_clients} clients x {classes_per_client} classes each); raise data_config.num_clients "
                        f"or data_config.classes_per_client")
    class_sizes = np.bincount(labels, minlength=num_classes)
    counts = np.zeros(owned.shape, dtype=np.int64)
    for cls in np.flatnonzero(owned.any(axis=0)):
        counts[owned[:, cls], cls] = apportion(int(class_sizes[cls]), np.ones(owned[:, cls].sum()), rng)
    if counts.sum(axis=1).min() < min_samples:
        raise UserError(f"data_config: label_quantity leaves a client under min_samples {min_samples} samples; "
                        f"lower data_config.num_clients or raise data_config.classes_per_client")
    return _indices_from_counts(labels, counts, rng)


def matched_test_split(train_labels: np.ndarray, train_parts: list[np.ndarray], test_labels: np.ndarray,
                       seed: int) -> list[np.ndarray]:
    """Local test splits with each client's train label proportions, covering the test set once.

    For each class, its test samples are dealt to clients in proportion to how many train samples
    of that class each client holds (largest remainder), so the union of the splits is the whole
    test set and every test sample belongs to exactly one client.
    """
    rng = np.random.default_rng([seed, 1])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_counts = _label_counts(train_labels, train_parts, num_classes).astype(np.float64)
    test_sizes = np.bincount(test_labels, minlength=num_classes)
    counts = np.zeros_like(train_counts, dtype=np.int64)
    for cls in range(num_classes):
        weights = train_counts[:, cls] if train_counts[:, cls].sum() > 0 else np.ones(len(train_parts))
        counts[:, cls] = apportion(int(test_sizes[cls]), weights, rng)
    return _indices_from_counts(test_labels, counts, rng)


def partition(train_labels: np.ndarray, test_labels: np.ndarray, method: str, num_clients: int, seed: int,
              alpha: float = 0.3, classes_per_client: int = 2, min_samples: int = 1) -> ClientSplit:
    """Partition train labels with ``method`` (``iid``, ``dirichlet``, ``dirichlet_capped``, ``shards``,
    ``label_quantity``) and match test splits.

    Args:
        train_labels, test_labels: int arrays of shape (N,) and (M,), classes 0..C-1.
    Returns:
        A :class:`ClientSplit` with ``num_clients`` train and test index arrays.
    """
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    if method == "iid":
        parts = iid(train_labels, num_clients, seed, min_samples)
    elif method == "dirichlet":
        parts = dirichlet(train_labels, num_clients, alpha, seed, min_samples)
    elif method == "dirichlet_capped":
        parts = dirichlet_capped(train_labels, num_clients, alpha, seed, min_samples)
    elif method == "shards":
        parts = shards(train_labels, num_clients, classes_per_client, seed, min_samples)
    elif method == "label_quantity":
        parts = label_quantity(train_labels, num_clients, classes_per_client, seed, min_samples)
    else:
        raise UserError(f"data_config.partition: unknown method {method!r}; use iid, dirichlet, dirichlet_capped, "
                        f"shards or label_quantity")
    return ClientSplit(train=parts, test=matched_test_split(train_labels, parts, test_labels, seed))


def carve_validation(parts: list[np.ndarray], labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's train indices into (train, validation), keeping its label mix.

    Client i keeps ``round(fraction * n_i)`` of its n_i samples for validation (at most n_i - 1,
    so it keeps at least one to train on), apportioned over its classes in proportion to its own
    class counts (largest remainder) and drawn at random within each class, from a generator
    seeded with (seed, 2, i): the carve depends on the seed and the client only. ``labels`` (N,)
    are the train split's labels; labels that are not whole numbers of one dimension (a task's
    own targets) are carved without stratification.

    Returns:
        ``(train_parts, val_parts)``: two lists of int64 index arrays, one per client, disjoint,
        whose union per client is ``parts[i]`` (each keeps the order of ``parts[i]``).
    """
    labels = np.asarray(labels)
    stratify = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    train, val = [], []
    for i, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        take = min(int(round(fraction * len(part))), max(len(part) - 1, 0))
        rng = np.random.default_rng([seed, 2, i])
        chosen = _stratified_pick(labels[part], take, rng) if stratify else rng.permutation(len(part))[:take]
        mask = np.zeros(len(part), bool)
        mask[chosen] = True
        train.append(part[~mask])
        val.append(part[mask])
    return train, val


def _stratified_pick(labels: np.ndarray, take: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (into ``labels``) of ``take`` samples with the label proportions of ``labels``."""
    if take == 0:
        return np.zeros(0, np.int64)
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = apportion(take, sizes, rng)
    picks = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(per_class)]
    return np.concatenate(picks)
