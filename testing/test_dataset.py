"""The CIFAR-10 task's dataset contract and its on-device augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import DataConfig
from core.errors import UserError
from experiments.cv.dataloaders.cifar10 import read_batches
from experiments.cv.dataloaders.dataloader import CIFAR10DataLoader, MEAN, STD
from experiments.cv.dataloaders.dataset import CIFAR10Dataset

CFG = DataConfig(num_clients=50, partition="dirichlet", alpha=0.5, download=False)


@pytest.fixture(scope="module")
def train_all(cifar_path):
    return CIFAR10Dataset(str(cifar_path), CFG, split="train", seed=1)


def test_read_batches_shapes_and_class_counts(cifar_path):
    images, labels = read_batches(cifar_path, "test", download=False)
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10


@pytest.mark.parametrize("damage,needle", [
    (lambda real: real.read_bytes()[:100_000], "is unreadable (UnpicklingError)"),  # truncated download
    (lambda real: real.with_name("batches.meta").read_bytes(), "holds no 'data' and 'labels'"),  # another file
    (lambda real: b"not a pickle at all", "is unreadable"),
])
def test_damaged_batch_file_is_named(cifar_path, tmp_path, damage, needle):
    real = cifar_path / "cifar-10-batches-py"
    copy = tmp_path / "cifar-10-batches-py"
    copy.mkdir()
    for f in real.iterdir():
        (copy / f.name).symlink_to(f)
    (copy / "test_batch").unlink()
    (copy / "test_batch").write_bytes(damage(real / "test_batch"))
    with pytest.raises(UserError) as err:
        read_batches(tmp_path, "test", download=False)
    assert f"CIFAR-10 batch file {copy / 'test_batch'} " in str(err.value) and needle in str(err.value)
    assert "official python version" in str(err.value)
    with pytest.raises(UserError, match="is a file; pass the folder that holds 'cifar-10-batches-py'"):
        read_batches(real / "test_batch", "test")


def test_all_users_and_one_user(cifar_path, train_all):
    assert train_all.user_list == [str(i) for i in range(50)]
    assert sum(train_all.num_samples) == 50_000
    one = CIFAR10Dataset(str(cifar_path), CFG, split="train", user_idx=7, seed=1)
    assert one.user_list == ["7"] and one.num_samples == [train_all.num_samples[7]]
    assert torch.equal(one.user_data["7"], train_all.user_data["7"])
    idx = torch.from_numpy(train_all.client_indices[7])
    assert torch.equal(one.user_data_labels["7"], train_all.labels[idx])
    assert one.user_data["7"].shape == (one.num_samples[0], 3, 32, 32)


def test_test_split_uses_the_train_plan(cifar_path, train_all):
    test = CIFAR10Dataset(str(cifar_path), CFG, split="test", seed=1, split_plan=train_all.split_plan)
    assert sum(test.num_samples) == 10_000
    fresh = CIFAR10Dataset(str(cifar_path), CFG, split="test", seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(test.client_indices, fresh.client_indices))


def test_augmented_batches_are_crops_and_flips_of_the_originals(train_all):
    loader = CIFAR10DataLoader(train_all, 16, torch.device("cpu"), train=True, augment=True)
    indices = torch.arange(16)
    batch = next(loader.batches(indices, torch.Generator().manual_seed(0)))
    assert batch["x"].shape == (16, 3, 32, 32) and batch["x"].dtype == torch.float32
    order = train_all.labels[indices]
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    padded = torch.nn.functional.pad(train_all.inputs[:16].float(), (4, 4, 4, 4))
    flips = 0
    for x, y in zip(batch["x"], batch["y"]):
        raw = x * std + mean
        # find which original image, offset and flip produced this crop
        matches = [(i, dy, dx, f) for i in range(16) for dy in range(9) for dx in range(9) for f in (0, 1)
                   if torch.allclose((padded[i, :, dy:dy + 32, dx:dx + 32].flip(2) if f else
                                      padded[i, :, dy:dy + 32, dx:dx + 32]), raw, atol=1e-3)]
        assert matches, "every augmented image is a crop (and maybe flip) of an original"
        assert order[matches[0][0]] == y
        flips += matches[0][3]
    assert 0 < flips < 16
    same = next(loader.batches(indices, torch.Generator().manual_seed(0)))
    assert torch.equal(same["x"], batch["x"]), "same generator seed, same batch"


def test_raw_pixels_and_reflection_padding_as_niid_bench(train_all):
    """normalize=false gives pixels / 255 in [0, 1]; pad_mode=reflect crops from the reflected border."""
    import copy
    raw_ds = copy.copy(train_all)
    raw_ds.data_config = CFG.model_copy(update={"normalize": False, "pad_mode": "reflect"})
    loader = CIFAR10DataLoader(raw_ds, 32, torch.device("cpu"), train=True, augment=True)
    batch = next(loader.batches(torch.arange(32), torch.Generator().manual_seed(3)))
    reflect = torch.nn.functional.pad(train_all.inputs[:32].float(), (4, 4, 4, 4), mode="reflect") / 255
    zeros = torch.nn.functional.pad(train_all.inputs[:32].float(), (4, 4, 4, 4)) / 255
    assert 0.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    shifted = 0
    for x, y in zip(batch["x"], batch["y"]):
        crops = [(i, dy, dx) for i in range(32) for dy in range(9) for dx in range(9)
                 if train_all.labels[i] == y and any(torch.allclose(c, x, atol=1e-6) for c in
                                                     (reflect[i, :, dy:dy + 32, dx:dx + 32],
                                                      reflect[i, :, dy:dy + 32, dx:dx + 32].flip(2)))]
        assert crops, "every image is a crop (maybe flipped) of a reflection-padded original"
        i, dy, dx = crops[0]
        shifted += (dy, dx) != (4, 4) and not torch.allclose(zeros[i, :, dy:dy + 32, dx:dx + 32],
                                                            reflect[i, :, dy:dy + 32, dx:dx + 32])
    assert shifted > 0, "some crops show the reflected border, which zero padding would not give"
    plain = CIFAR10DataLoader(raw_ds, 32, torch.device("cpu"), train=False, augment=False)
    assert torch.equal(next(plain.batches(torch.arange(4)))["x"], train_all.inputs[:4].float() / 255)


@pytest.mark.parametrize("augment, shuffled", [(True, True), (True, False), (False, True)])
def test_collating_many_plans_equals_their_batches_one_by_one(train_all, augment, shuffled):
    """The loader contract vectorized training relies on: one ``collate`` over several clients' batch
    plans gives exactly the rows their own batches would, in order (crops, flips and the center crop
    of an augmenting loader read without a generator included)."""
    loader = CIFAR10DataLoader(train_all, 8, torch.device("cpu"), train=True, augment=augment)
    clients = [torch.arange(0, 20), torch.arange(500, 513), torch.arange(900, 908)]

    def generator(c):
        return torch.Generator().manual_seed(c) if shuffled else None
    one_by_one = [b for c, idx in enumerate(clients) for b in loader.batches(idx, generator(c))]
    plans = [p for c, idx in enumerate(clients) for p in loader.plan_batches(idx, generator(c))]
    assert [len(p["idx"]) for p in plans] == [8, 8, 4, 8, 5, 8]
    assert ("offsets" in plans[0]) == (augment and shuffled)
    together = loader.collate(plans)
    assert together["x"].shape == (41, 3, 32, 32)
    for key in ("x", "y"):
        assert torch.equal(together[key], torch.cat([b[key] for b in one_by_one]))
    assert not torch.equal(together["x"][:8], together["x"][8:16])
