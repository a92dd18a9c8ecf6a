"""Tiny Shakespeare split into clients, one per speaking role, after LEAF's recipe (Caldas et al.
2018, arXiv:1812.01097; McMahan et al. 2017, arXiv:1602.05629).

A role's text is its speeches in the order of the file, each speech's lines joined by a newline and
speeches joined by a newline (the ``NAME:`` lines themselves are left out). A sample is a window of
``seq_len`` characters (80) and its target is the character that follows: a role of L characters
has ``L - seq_len`` windows (every ``stride``-th of them, 1: all, as LEAF). The first
``train_fraction`` (80%) of a role's samples, in text order, are its train split and the rest its
local test split. A role is kept when its train split holds at least ``data_config.min_samples``
samples; ``data_config.num_clients`` must equal the number of roles kept (the error says how many).
With ``data_config.val_fraction``, the end of each role's train split is its validation split.

Characters are coded by :data:`VOCAB`, the 65 distinct characters of ``input.txt`` sorted by code
point. It is fixed in this file, so every run, evaluation and reload codes characters the same way;
a data file holding a character outside it is refused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.dataset import BaseDataset
from core.errors import UserError
from core.partition import ClientSplit

# sorted(set(open("input.txt").read())) of tiny Shakespeare (1,115,394 bytes, md5 6fb458f1...).
VOCAB = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FILE_NAME = "input.txt"
DEFAULTS = {"seq_len": 80, "train_fraction": 0.8, "stride": 1}


@dataclass(frozen=True)
class Role:
    """One speaking role: its name (without the colon) and its speeches joined, as (L,) uint8 codes."""

    name: str
    codes: np.ndarray


def encode(text: str, where: str = "text") -> np.ndarray:
    """(len(text),) uint8 codes of ``text`` in :data:`VOCAB`.

    Raises:
        UserError: ``text`` holds a character outside the vocabulary (``where`` names the file).
    """
    table = np.full(0x110000 if any(ord(c) > 255 for c in text) else 256, 255, dtype=np.uint8)
    table[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)
    codes = table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    if (codes == 255).any():
        bad = text[int(np.flatnonzero(codes == 255)[0])]
        raise UserError(f"{where}: character {bad!r} is not in the task's {len(VOCAB)}-character vocabulary "
                        f"(experiments/shakespeare/dataloaders/dataset.py VOCAB); use the tiny Shakespeare "
                        f"input.txt, or add the character to VOCAB and set model_config.num_classes to its length")
    return codes


def decode(codes) -> str:
    """The text of a sequence of vocabulary codes."""
    return "".join(VOCAB[int(c)] for c in codes)


def parse_speeches(text: str) -> list[tuple[str, str]]:
    """``(role, speech)`` pairs in file order. A speech is a run of non-blank lines whose first line
    is ``NAME:``; the speech is its other lines joined by newlines. Runs without such a first line
    (none in tiny Shakespeare) are skipped."""
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0][:-1], "\n".join(lines[1:])))
    return out


@functools.lru_cache(maxsize=4)
def read_roles(data_path: str) -> tuple[Role, ...]:
    """Every role of ``data_path/input.txt`` in order of its first speech, with its speeches joined
    by newlines, coded by :data:`VOCAB`.

    Raises:
        UserError: the file is missing, not UTF-8, or holds a character outside the vocabulary.
    """
    path = Path(data_path) / FILE_NAME
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"-dataPath {data_path}: no {FILE_NAME}; pass the folder holding tiny Shakespeare's "
                        f"input.txt (e.g. ../shared/data/shakespeare)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data file {path} cannot be read as UTF-8 text ({type(exc).__name__}); "
                        f"pass the folder holding tiny Shakespeare's input.txt") from None
    encode(text, str(path))  # every character of the file, names included, must be in the vocabulary
    speeches: dict[str, list[str]] = {}
    for role, speech in parse_speeches(text):
        speeches.setdefault(role, []).append(speech)
    return tuple(Role(name, encode("\n".join(parts), str(path))) for name, parts in speeches.items())


def options(data_config) -> tuple[int, float, int]:
    """``(seq_len, train_fraction, stride)`` from ``data_config.options`` (LEAF's 80, 0.8, 1 by default).

    Raises:
        UserError: a value out of range, naming the option.
    """
    opts = {**DEFAULTS, **dict(getattr(data_config, "options", None) or {})}
    seq_len, fraction, stride = opts["seq_len"], opts["train_fraction"], opts["stride"]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"data_config.options.seq_len: {seq_len!r}; give a whole number of characters >= 1 (LEAF: 80)")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UserError(f"data_config.options.train_fraction: {fraction!r}; give a number between 0 and 1 (LEAF: 0.8)")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise UserError(f"data_config.options.stride: {stride!r}; give a whole number >= 1 (1: every window, as LEAF)")
    return seq_len, float(fraction), stride


def role_samples(role: Role, seq_len: int, stride: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Start positions of a role's train and test windows, in text order: windows start at 0,
    stride, 2 stride, ... while a target follows (start + seq_len < L); the first
    ``floor(fraction * n)`` of the n windows train, the rest test."""
    starts = np.arange(0, max(len(role.codes) - seq_len, 0), stride, dtype=np.int64)
    cut = int(np.floor(fraction * len(starts)))
    return starts[:cut], starts[cut:]


@functools.lru_cache(maxsize=8)
def kept_roles(data_path: str, seq_len: int, stride: int, fraction: float, min_samples: int) -> tuple[int, ...]:
    """Indices into :func:`read_roles` of the roles whose train split holds at least ``min_samples``."""
    return tuple(i for i, role in enumerate(read_roles(data_path))
                 if len(role_samples(role, seq_len, stride, fraction)[0]) >= min_samples)


def windows(codes: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``: (n, seq_len) uint8 windows of ``codes`` at ``starts`` and (n,) int64
    codes of the character after each."""
    rows = starts[:, None] + np.arange(seq_len)
    return torch.from_numpy(codes[rows]), torch.from_numpy(codes[starts + seq_len].astype(np.int64))


class ShakespeareDataset(BaseDataset):
    """Clients are speaking roles. ``inputs`` (N, seq_len) uint8 character codes, ``labels`` (N,)
    int64 code of the next character; rows are the kept roles' samples, role after role.

    ``data_config.options``: ``seq_len`` (80), ``train_fraction`` (0.8), ``stride`` (1).
    """

    OPTIONS = ("seq_len", "train_fraction", "stride")

    @classmethod
    def roles(cls, data_path: str, data_config) -> list[str]:
        """Names of the kept roles: client i is ``roles(...)[i]``."""
        seq_len, fraction, stride = options(data_config)
        every = read_roles(data_path)
        return [every[i].name for i in kept_roles(data_path, seq_len, stride, fraction, data_config.min_samples)]

    @classmethod
    def _kept(cls, data_path: str, data_config) -> tuple[list[Role], int, float, int]:
        seq_len, fraction, stride = options(data_config)
        every = read_roles(data_path)
        kept = [every[i] for i in kept_roles(data_path, seq_len, stride, fraction, data_config.min_samples)]
        if len(kept) != data_config.num_clients:
            raise UserError(f"data_config.num_clients: {data_config.num_clients}, but {len(kept)} of the {len(every)} "
                            f"roles have at least min_samples {data_config.min_samples} train samples (seq_len "
                            f"{seq_len}, stride {stride}); set data_config.num_clients: {len(kept)} or change "
                            f"data_config.min_samples")
        return kept, seq_len, fraction, stride

    @classmethod
    def load_split(cls, data_path, split, data_config) -> tuple[torch.Tensor, torch.Tensor]:
        kept, seq_len, fraction, stride = cls._kept(data_path, data_config)
        parts = [windows(r.codes, role_samples(r, seq_len, stride, fraction)[0 if split == "train" else 1], seq_len)
                 for r in kept]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @classmethod
    def make_split_plan(cls, data_path, data_config, seed, known=None) -> ClientSplit:
        """Client i holds the rows of role i in each split (contiguous, in text order). With
        ``data_config.val_fraction`` > 0, the last ``round(val_fraction * n)`` of a role's n train
        samples (at most n - 1) are its validation split, in order, so that validation windows do
        not sit among the training windows they overlap. ``seed`` is unused: the split is the same
        in every run."""
        kept, seq_len, fraction, stride = cls._kept(data_path, data_config)
        sizes = np.array([[len(s) for s in role_samples(r, seq_len, stride, fraction)] for r in kept],
                         dtype=np.int64).reshape(-1, 2)
        bounds = np.zeros((len(kept) + 1, 2), dtype=np.int64)
        bounds[1:] = np.cumsum(sizes, axis=0)
        train = [np.arange(bounds[i, 0], bounds[i + 1, 0]) for i in range(len(kept))]
        test = [np.arange(bounds[i, 1], bounds[i + 1, 1]) for i in range(len(kept))]
        if data_config.val_fraction <= 0:
            return ClientSplit(train=train, test=test)
        held = [min(int(round(data_config.val_fraction * len(rows))), len(rows) - 1) for rows in train]
        return ClientSplit(train=[rows[:len(rows) - k] for rows, k in zip(train, held)], test=test,
                           val=[rows[len(rows) - k:] for rows, k in zip(train, held)])
