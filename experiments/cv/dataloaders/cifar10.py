"""Read CIFAR-10 from the official "python version" pickles into uint8 tensors.

We read the pickles ourselves instead of ``torchvision.datasets.CIFAR10`` because its md5 check
rejects rebuilt copies of the data; torchvision is used only to download a missing copy.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError

FOLDER = "cifar-10-batches-py"
FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
NUM_CLASSES = 10


def _download(data_path: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10
        CIFAR10(root=str(data_path), train=True, download=True)
    except Exception as exc:  # offline, DNS, HTTP errors: all mean "put the data there yourself"
        raise UserError(
            f"CIFAR-10 not found in {data_path / FOLDER} and the download failed ({type(exc).__name__}); "
            f"put the extracted '{FOLDER}' folder (python version) inside -dataPath {data_path}") from None


def read_batches(data_path: str | Path, split: str, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of ``split`` (``train``: 50,000, ``test``: 10,000).

    Raises:
        UserError: when the folder or a batch file is missing (after a download attempt if allowed), or
            a batch file is damaged (see :func:`_read_batch`).
    """
    data_path = Path(data_path)
    if data_path.exists() and not data_path.is_dir():
        raise UserError(f"-dataPath {data_path} is a file; pass the folder that holds '{FOLDER}'")
    folder = data_path / FOLDER
    if not folder.is_dir() and download:
        _download(data_path)
    images, labels = [], []
    for name in FILES[split]:
        path = folder / name
        if not path.is_file():
            raise UserError(f"CIFAR-10 batch file {path} not found; -dataPath must be the folder that holds "
                            f"'{FOLDER}' with data_batch_1..5 and test_batch")
        batch_images, batch_labels = _read_batch(path)
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) uint8 images and (n,) int64 labels of one pickled batch file.

    Raises:
        UserError: the file is not a readable CIFAR-10 batch (truncated, another file, other shapes),
            or holds labels that are not whole numbers 0..9 or pixels that are not whole numbers 0..255.
    """
    fix = f"replace it with the file of the official python version ({FOLDER}.tar.gz)"
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
    except Exception as exc:  # truncated or foreign bytes surface as many exception types
        raise UserError(f"CIFAR-10 batch file {path} is unreadable ({type(exc).__name__}); {fix}") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise UserError(f"CIFAR-10 batch file {path} holds no 'data' and 'labels'; {fix}")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except Exception as exc:  # ragged or odd objects
        raise UserError(f"CIFAR-10 batch file {path} holds 'data' or 'labels' that are not arrays "
                        f"({type(exc).__name__}); {fix}") from None
    if labels.ndim != 1 or not (labels.size == 0 or _whole(labels)):
        raise UserError(f"CIFAR-10 batch file {path} holds labels of type {labels.dtype} and shape {labels.shape}, "
                        f"not a list of whole numbers 0..9; {fix}")
    labels = labels.astype(np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 batch file {path} holds data of shape {data.shape} with {len(labels)} labels, "
                        f"not (n, 3072) with n labels; {fix}")
    outside = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if outside.size:
        raise UserError(f"CIFAR-10 batch file {path} holds {outside.size} labels outside 0..{NUM_CLASSES - 1} "
                        f"(e.g. {outside[0]}); {fix}")
    if data.dtype != np.uint8 and data.size and (not _whole(data) or data.min() < 0 or data.max() > 255):
        raise UserError(f"CIFAR-10 batch file {path} holds pixels of type {data.dtype} outside the whole numbers "
                        f"0..255; {fix}")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def _whole(values: np.ndarray) -> bool:
    """Whether ``values`` are integers (not booleans, floats or text)."""
    return np.issubdtype(values.dtype, np.integer)
