"""The data contract every task implements: a BaseDataset (clients' data) and a BaseDataLoader."""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Optional

import numpy as np
import torch

from core.errors import UserError
from core.partition import ClientSplit, partition


class _ClientView(Mapping):
    """Read-only ``user -> tensor`` mapping that slices a shared tensor on access (no copies kept)."""

    def __init__(self, users: list[str], tensor: torch.Tensor, indices: list[np.ndarray]):
        self._users = {u: i for u, i in zip(users, indices)}
        self._tensor = tensor

    def __getitem__(self, user: str) -> torch.Tensor:
        return self._tensor[torch.from_numpy(self._users[user])]

    def __iter__(self):
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)


class BaseDataset:
    """All clients' data of one split (``"train"`` or ``"test"``), FLUTE-style.

    Subclasses implement :meth:`load_split`; this class partitions with ``data_config`` (see
    :mod:`core.partition`) and exposes:

    - ``user_list``: client names (``str(client id)``); one name when built with ``user_idx >= 0``.
    - ``user_data`` / ``user_data_labels``: ``name -> Tensor`` of that client's inputs / labels.
    - ``num_samples``: samples per listed client, aligned with ``user_list``.
    - ``inputs`` (N, ...) and ``labels`` (N,): the whole split; ``client_indices[i]``: client i's rows.
    - ``data_config``: the config section it was built with (loaders read their preprocessing there).

    A task whose data is generated, not read from files, sets ``READS_FILES = False``: it then runs
    without -dataPath (``data_path`` None).

    ``OPTIONS`` names the keys of ``data_config.options`` the dataset reads (any other key is a config
    error). A task with natural clients overrides :meth:`make_split_plan`; it must then return
    ``data_config.num_clients`` clients.

    Raises:
        UserError: from :meth:`load_split` when the data is missing; when it returns inputs or labels
            that are not tensors, or labels not of shape (N,) (:meth:`checked_split`); or from the
            partitioner.
    """

    READS_FILES = True
    OPTIONS: tuple[str, ...] = ()  # keys of data_config.options the dataset reads (others are refused)

    def __init__(self, data_path: str | None, data_config, split: str = "train", user_idx: int = -1, seed: int = 0,
                 split_plan: Optional[ClientSplit] = None):
        self.split = split
        self.data_config = data_config
        self.inputs, self.labels = self.checked_split(data_path, split, data_config)
        self.split_plan = split_plan or self.make_split_plan(data_path, data_config, seed, {split: self.labels})
        parts = self.split_plan.train if split == "train" else self.split_plan.test
        self.client_indices = parts
        ids = range(len(parts)) if user_idx < 0 else [user_idx]
        self.user_list = [str(i) for i in ids]
        chosen = [parts[i] for i in ids]
        self.num_samples = [len(p) for p in chosen]
        self.user_data = _ClientView(self.user_list, self.inputs, chosen)
        self.user_data_labels = _ClientView(self.user_list, self.labels, chosen)

    @classmethod
    def load_split(cls, data_path: str | None, split: str, data_config) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(inputs, labels)`` of the whole split as CPU tensors; labels int64 of shape (N,)."""
        raise NotImplementedError

    @classmethod
    def checked_split(cls, data_path: str | None, split: str, data_config) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`load_split`, with its result checked: a pair of tensors, labels of shape (N,) with
        one label per input row.

        Raises:
            UserError: one line naming the task file, when the result is anything else (e.g. numpy
                arrays, which would otherwise fail later with an AttributeError deep in the engine).
        """
        result = cls.load_split(data_path, split, data_config)
        where = f"task file {inspect.getsourcefile(cls) or cls.__module__}: {cls.__name__}.load_split({split!r})"
        if not isinstance(result, tuple) or len(result) != 2:
            raise UserError(f"{where} returned {type(result).__name__}; return (inputs, labels), two torch tensors")
        for name, value in zip(("inputs", "labels"), result):
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{where} returned {name} as {type(value).__module__}.{type(value).__name__}; "
                                f"return torch tensors (e.g. torch.from_numpy({name}))")
        inputs, labels = result
        if labels.dim() != 1 or len(inputs) != len(labels):
            raise UserError(f"{where} returned labels of shape {tuple(labels.shape)} for {len(inputs)} inputs; "
                            f"labels must have shape (N,), one per row of inputs")
        return inputs, labels

    @classmethod
    def make_split_plan(cls, data_path: str | None, data_config, seed: int, known: Optional[dict] = None) -> ClientSplit:
        """Partition the train split into clients and match local test splits (deterministic in seed).

        ``known`` maps a split name to its labels already in memory, so that split is not read again.
        """
        known = known or {}
        train_labels, test_labels = (
            (known[s] if s in known else cls.checked_split(data_path, s, data_config)[1]).numpy()
            for s in ("train", "test"))
        return partition(train_labels, test_labels, data_config.partition, data_config.num_clients, seed,
                         alpha=data_config.alpha, classes_per_client=data_config.classes_per_client,
                         min_samples=data_config.min_samples)


class BaseDataLoader:
    """Turns one client's sample indices into batches (dicts of tensors on ``device``).

    The split's tensors are moved to ``device`` once; batching, shuffling and augmentation run on
    that device with the caller's ``torch.Generator`` so results depend only on the seed.

    A loader implements either :meth:`batches` alone, or the two halves :meth:`plan_batches` (what
    each batch is: sample indices and random augmentation parameters, drawn from the generator) and
    :meth:`collate` (build the batch of one or more plans), from which :meth:`batches` follows.
    With the halves, vectorized training (``client_config.vectorize``) builds the batches of all its
    clients for a step in one ``collate`` call instead of one call per client.
    """

    def __init__(self, dataset: BaseDataset, batch_size: int, device: torch.device, train: bool, augment: bool):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.augment = augment and train

    def batches(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        """Yield batches over ``indices`` (int64 device tensor), shuffled when a generator is given.

        Raises:
            NotImplementedError: the loader implements neither this nor :meth:`plan_batches`.
        """
        for plan in self.plan_batches(indices, generator):
            yield self.collate([plan])

    def plan_batches(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> Iterator[dict]:
        """Yield one plan per batch over ``indices``: a dict of device tensors whose first dimension
        is that batch's size (e.g. ``{"idx": (B,) int64}``). Every random draw (shuffle,
        augmentation) happens here, in batch order, from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither batches nor plan_batches")

    def collate(self, plans: list[dict]) -> dict:
        """The batch of ``plans`` concatenated in order: a dict of device tensors whose first
        dimension is the sum of the plans' batch sizes."""
        raise NotImplementedError(f"{type(self).__name__} implements plan_batches but not collate")

    @staticmethod
    def join_plans(plans: list[dict]) -> dict:
        """One plan holding ``plans`` concatenated along their first dimension (no copy for one plan)."""
        if len(plans) == 1:
            return plans[0]
        return {key: torch.cat([p[key] for p in plans]) for key in plans[0]}

    @property
    def has_batch_plans(self) -> bool:
        """Whether this loader implements :meth:`plan_batches` and :meth:`collate`."""
        return type(self).plan_batches is not BaseDataLoader.plan_batches
