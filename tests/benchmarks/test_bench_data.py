"""benchmarks/data.py on small fake files in the real formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_fake_cifar, make_fake_fashion_mnist

from benchmarks import data as data_lib


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide the machine's own data: no $REGOPT_DATA, no Debian folder, an empty torchvision root."""
    monkeypatch.delenv("REGOPT_DATA", raising=False)
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(data_lib, "DEFAULT_ROOT", tmp_path / "no-root")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_regopt_data(monkeypatch, tmp_path, no_system_data, compress):
    arrays = make_fake_fashion_mnist(tmp_path / "fm", compress=compress)
    monkeypatch.setenv("REGOPT_DATA", str(tmp_path / "fm"))
    splits = data_lib.load("fashion-mnist", train_size=20, heldout_size=8)
    train_images = arrays["train-images-idx3-ubyte"]
    train_labels = arrays["train-labels-idx1-ubyte"]
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (20, 1, 28, 28)
    assert splits.heldout.images.shape == (8, 1, 28, 28) and splits.test.images.shape == (10, 1, 28, 28)
    # first train_size for training, the *last* heldout_size held out (images 20, 21 are unused here)
    np.testing.assert_array_equal(splits.train.images[:, 0].numpy(), train_images[:20])
    np.testing.assert_array_equal(splits.heldout.images[:, 0].numpy(), train_images[-8:])
    np.testing.assert_array_equal(splits.heldout.labels.numpy(), train_labels[-8:])
    np.testing.assert_array_equal(splits.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert splits.train.labels.dtype == torch.int64 and splits.num_classes == 10 and not splits.augment
    x, y = splits.train_batch(torch.tensor([3, 0]))
    expected = (torch.from_numpy(train_images[[3, 0]]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == train_labels[[3, 0]].tolist()
    batches = list(splits.eval_batches("heldout", batch_size=3))
    assert [len(b[1]) for b in batches] == [3, 3, 2]
    assert sum(len(b[1]) for b in splits.eval_batches("test", 4, limit=5)) == 5


def test_fashion_mnist_torchvision_layout(tmp_path, no_system_data):
    make_fake_fashion_mnist(tmp_path / "root" / "FashionMNIST" / "raw")
    splits = data_lib.load("fashion-mnist", root=tmp_path / "root", train_size=25, heldout_size=5)
    assert len(splits.train) == 25 and len(splits.heldout) == 5


def test_fashion_mnist_missing_says_where_and_how(tmp_path, no_system_data):
    with pytest.raises(data_lib.DatasetNotFoundError) as info:
        data_lib.load("fashion-mnist", root=tmp_path / "root")
    message = str(info.value)
    assert "no-debian" in message and str(tmp_path / "root" / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


def test_split_sizes_checked(monkeypatch, tmp_path, no_system_data):
    make_fake_fashion_mnist(tmp_path / "fm")
    monkeypatch.setenv("REGOPT_DATA", str(tmp_path / "fm"))
    with pytest.raises(ValueError, match="train_size"):
        data_lib.load("fashion-mnist", train_size=25, heldout_size=10)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, monkeypatch, name):
    monkeypatch.delenv("REGOPT_DATA", raising=False)
    train, train_labels, test, test_labels = make_fake_cifar(tmp_path, name, per_batch=6 if name == "cifar10" else 30)
    splits = data_lib.load(name, root=tmp_path, train_size=20, heldout_size=10)
    assert splits.num_classes == (10 if name == "cifar10" else 100) and splits.augment
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.heldout.images.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(splits.train.images.numpy(), train[:20])
    np.testing.assert_array_equal(splits.heldout.images.numpy(), train[-10:])
    np.testing.assert_array_equal(splits.heldout.labels.numpy(), train_labels[-10:])
    np.testing.assert_array_equal(splits.test.images.numpy(), test)
    np.testing.assert_array_equal(splits.test.labels.numpy(), test_labels)
    g = torch.Generator().manual_seed(0)
    x, y = splits.train_batch(torch.arange(4), g)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == train_labels[:4].tolist()


def test_cifar_layout_matches_torchvision(tmp_path, monkeypatch):
    """The same fake pickles read by torchvision (integrity check bypassed) give the same images and labels."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.delenv("REGOPT_DATA", raising=False)
    make_fake_cifar(tmp_path, "cifar10")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    splits = data_lib.load("cifar10", root=tmp_path, train_size=20, heldout_size=10)
    ours = torch.cat([splits.train.images, splits.heldout.images]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, reference.data)
    assert torch.cat([splits.train.labels, splits.heldout.labels]).tolist() == list(reference.targets)


def test_cifar_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("REGOPT_DATA", raising=False)
    with pytest.raises(data_lib.DatasetNotFoundError, match="--download"):
        data_lib.load("cifar100", root=tmp_path)


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = data_lib.random_crop_flip(images, 2, g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flipped = 0
    for i in range(16):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        if any(torch.equal(out[i], c) for c in crops):
            continue
        assert any(torch.equal(out[i], c.flip(2)) for c in crops), f"image {i} is no (flipped) crop"
        flipped += 1
    assert 0 < flipped < 16
    again = data_lib.random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(data_lib.random_crop_flip(images, 0, g).sort(-1).values, images.sort(-1).values)


def test_epoch_sampler_permutes_and_resumes():
    sampler = data_lib.EpochSampler(10, 3, seed=1)
    first_epoch = torch.cat([sampler.next() for _ in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # drop_last: one example left out
    state = sampler.state_dict()
    ahead = [sampler.next() for _ in range(4)]
    resumed = data_lib.EpochSampler(10, 3, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [resumed.next() for _ in range(4)]))
    other = data_lib.EpochSampler(10, 3, seed=2)
    assert not torch.equal(torch.cat([other.next() for _ in range(3)]), first_epoch)
    batch = torch.arange(10)
    shards = [data_lib.EpochSampler.shard(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards), batch)
    with pytest.raises(ValueError, match="exceeds"):
        data_lib.EpochSampler(4, 5, seed=0)


def test_synthetic_is_deterministic():
    a = data_lib.load("synthetic", num_train=20, num_heldout=5, num_test=5, shape=(3, 8, 8))
    b = data_lib.load("synthetic", num_train=20, num_heldout=5, num_test=5, shape=(3, 8, 8))
    assert torch.equal(a.train.images, b.train.images) and a.input_shape == (3, 8, 8)
    x, _ = a.train_batch(torch.arange(5))
    assert x.shape == (5, 3, 8, 8)
