"""benchmarks/data.py on the embedded Fashion-MNIST subset (real data, always present), on the full files when
the machine has them, and on small fake files in the real formats."""

from __future__ import annotations

import gzip
import hashlib
import socket
import sys
import zlib

import numpy as np
import pytest
import torch
from conftest import make_fake_cifar, make_fake_fashion_mnist, trust_fake_cifar

from benchmarks import data as data_lib
from benchmarks import make_fashion_mnist_subset as make_subset


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
    # every way to provide the full set, in lookup order, and the subset that needs none of them
    ways = ["--data-root DIR or $REGOPT_DATA=DIR", "apt-get install dataset-fashion-mnist",
            "torchvision's root", "rerun with --download"]
    positions = [message.index(way) for way in ways]
    assert positions == sorted(positions)
    assert "`quick` preset" in message and "embedded subset" in message and "fashion-mnist-subset" in message


def test_fashion_mnist_missing_lists_regopt_data(tmp_path, monkeypatch, no_system_data):
    monkeypatch.setenv("REGOPT_DATA", str(tmp_path / "env"))
    with pytest.raises(data_lib.DatasetNotFoundError) as info:
        data_lib.load("fashion-mnist")
    message = str(info.value)
    assert f"{tmp_path / 'env'}   ($REGOPT_DATA=" in message
    assert f"{tmp_path / 'no-root' / 'FashionMNIST' / 'raw'}   (torchvision's default root" in message


def test_fashion_mnist_lookup_order_and_source(tmp_path, monkeypatch, no_system_data):
    """--data-root, then $REGOPT_DATA, then Debian's folder, then torchvision's default root; `source` says which."""
    places = {"root": tmp_path / "given", "env": tmp_path / "env", "debian": tmp_path / "no-debian",
              "default": tmp_path / "no-root" / "FashionMNIST" / "raw"}
    first_image = {}
    for seed, (name, folder) in enumerate(places.items()):
        first_image[name] = make_fake_fashion_mnist(folder, seed=seed)["train-images-idx3-ubyte"][0]
    monkeypatch.setenv("REGOPT_DATA", str(places["env"]))

    def loaded(root=None):
        splits = data_lib.load("fashion-mnist", root=root, train_size=20, heldout_size=8)
        return next(k for k, image in first_image.items() if np.array_equal(splits.train.images[0, 0], image)), splits

    which, splits = loaded(places["root"])
    assert which == "root" and splits.source == f"Fashion-MNIST from {places['root']} (--data-root {places['root']})"
    which, splits = loaded()
    assert which == "env" and splits.source == f"Fashion-MNIST from {places['env']} ($REGOPT_DATA={places['env']})"
    monkeypatch.delenv("REGOPT_DATA")
    which, splits = loaded()
    assert which == "debian"
    assert splits.source == f"Fashion-MNIST from {places['debian']} (Debian dataset-fashion-mnist)"
    monkeypatch.setattr(data_lib, "DEBIAN_FASHION_MNIST", tmp_path / "gone")
    which, splits = loaded()
    assert which == "default" and splits.source.startswith(f"Fashion-MNIST from {places['default']} (torchvision's")


def test_fashion_mnist_download_goes_through_torchvision(tmp_path, monkeypatch, no_system_data):
    """--download calls torchvision (faked here: it writes small files where torchvision would) and says so."""
    torchvision = pytest.importorskip("torchvision")
    calls = []

    def fake_fashion_mnist(root, train, download):
        calls.append((root, train, download))
        make_fake_fashion_mnist(tmp_path / "root" / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    with pytest.raises(data_lib.DatasetNotFoundError):
        data_lib.load("fashion-mnist", root=tmp_path / "root", train_size=20, heldout_size=8)
    assert calls == []
    splits = data_lib.load("fashion-mnist", root=tmp_path / "root", download=True, train_size=20, heldout_size=8)
    assert calls == [(str(tmp_path / "root"), True, True), (str(tmp_path / "root"), False, True)]
    assert splits.source == f"Fashion-MNIST downloaded by torchvision to {tmp_path / 'root' / 'FashionMNIST' / 'raw'}"


def test_split_sizes_checked(monkeypatch, tmp_path, no_system_data):
    make_fake_fashion_mnist(tmp_path / "fm")
    monkeypatch.setenv("REGOPT_DATA", str(tmp_path / "fm"))
    with pytest.raises(ValueError, match="train_size"):
        data_lib.load("fashion-mnist", train_size=25, heldout_size=10)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles(tmp_path, monkeypatch, name):
    monkeypatch.delenv("REGOPT_DATA", raising=False)
    train, train_labels, test, test_labels = make_fake_cifar(tmp_path, name, per_batch=6 if name == "cifar10" else 30)
    trust_fake_cifar(monkeypatch, tmp_path, name)
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
    trust_fake_cifar(monkeypatch, tmp_path, "cifar10")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=True)
    splits = data_lib.load("cifar10", root=tmp_path, train_size=20, heldout_size=10)
    ours = torch.cat([splits.train.images, splits.heldout.images]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, reference.data)
    assert torch.cat([splits.train.labels, splits.heldout.labels]).tolist() == list(reference.targets)


def test_cifar_lookup_order_and_source(tmp_path, monkeypatch):
    _, labels_given, _, _ = make_fake_cifar(tmp_path / "given", seed=1)
    _, labels_env, _, _ = make_fake_cifar(tmp_path / "env", seed=2)
    monkeypatch.setenv("REGOPT_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data_lib, "DEFAULT_ROOT", tmp_path / "no-root")
    trust_fake_cifar(monkeypatch, tmp_path / "given")  # two fake copies: trust each before its load
    splits = data_lib.load("cifar10", root=tmp_path / "given", train_size=20, heldout_size=10)
    folder = tmp_path / "given" / "cifar-10-batches-py"
    assert splits.train.labels.tolist() == labels_given[:20].tolist()
    assert splits.source == f"CIFAR-10 from {folder} (--data-root {tmp_path / 'given'})"
    trust_fake_cifar(monkeypatch, tmp_path / "env")
    splits = data_lib.load("cifar10", train_size=20, heldout_size=10)
    assert splits.train.labels.tolist() == labels_env[:20].tolist()
    folder = tmp_path / "env" / "cifar-10-batches-py"
    assert splits.source == f"CIFAR-10 from {folder} ($REGOPT_DATA={tmp_path / 'env'})"


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
    assert a.source == "synthetic (generated, seed 0)"
    x, _ = a.train_batch(torch.arange(5))
    assert x.shape == (5, 3, 8, 8)


# -- the embedded Fashion-MNIST subset ----------------------------------------------------------------
SUBSET_TOTALS = {"train": 8_000, "heldout": 2_000, "test": 2_000}
# (official set, first index, stop index) each split is drawn from: train on the first 50,000 training images,
# select on the last 10,000, report on the official test set.
SUBSET_POOLS = {"train": ("train", 0, 50_000), "heldout": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}


@pytest.fixture(scope="module")
def subset_arrays():
    return data_lib.read_fashion_mnist_subset()


def test_subset_shapes_class_counts_and_normalization(fashion_mnist_subset):
    data = fashion_mnist_subset
    assert data.name == "fashion-mnist-subset" and data.num_classes == 10 and not data.augment
    assert data.input_shape == (1, 28, 28)
    assert (data.mean, data.std) == data_lib.NORMALIZATION["fashion-mnist"]
    for split, total in SUBSET_TOTALS.items():
        part = getattr(data, split)
        assert part.images.shape == (total, 1, 28, 28) and part.images.dtype == torch.uint8
        assert part.labels.dtype == torch.int64
        assert torch.bincount(part.labels, minlength=10).tolist() == [total // 10] * 10
    assert data.source == ("embedded Fashion-MNIST subset (8,000 train / 2,000 held-out / 2,000 test, "
                           "benchmarks/fashion_mnist_subset)")
    x, y = data.train_batch(torch.tensor([5, 0]))
    expected = (data.train.images[[5, 0]].double() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(y, data.train.labels[[5, 0]])
    # real images, not a constant or noise: pixel mean near Fashion-MNIST's 0.286, mostly-black backgrounds
    pixels = data.train.images.double() / 255
    assert abs(pixels.mean().item() - 0.2860) < 0.01 and (data.train.images == 0).double().mean() > 0.4


def test_subset_indices_follow_the_protocol(subset_arrays):
    """Train from the first 50,000 training images, held-out from the last 10,000, test from the test set;
    distinct, increasing, and the held-out pool never overlaps the training pool."""
    for split, (_, start, stop) in SUBSET_POOLS.items():
        indices = subset_arrays[split]["indices"]
        assert indices.dtype == np.int32 and len(indices) == SUBSET_TOTALS[split]
        assert start <= indices.min() and indices.max() < stop
        assert np.all(np.diff(indices) > 0)


def test_subset_files_match_their_sums_and_readme():
    folder = data_lib.FASHION_MNIST_SUBSET
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    sums = dict(reversed(line.split("  ")) for line in lines)
    shipped = sorted(p.name for p in folder.glob("*.gz"))
    assert sorted(sums) == shipped and len(shipped) == 9
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    readme = (folder / "README.md").read_text()
    assert all(line in readme for line in lines)  # the README records the same sums
    total = sum((folder / name).stat().st_size for name in shipped)
    assert total <= 6_000_000 and f"{total:,} bytes" in readme
    licence = (folder / "LICENSE").read_text()
    assert "Copyright (c) 2017 Zalando SE" in licence and "The MIT License" in licence
    assert "Permission is hereby granted, free of charge" in licence


def test_subset_loads_without_network_dataset_package_or_full_data(monkeypatch, no_system_data):
    def no_network(*args, **kwargs):
        raise AssertionError("the embedded subset must load without the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now fails
    with pytest.raises(data_lib.DatasetNotFoundError):  # the full set is hidden ...
        data_lib.load("fashion-mnist")
    data = data_lib.load("fashion-mnist-subset", root="/nonexistent", download=True)  # ... the subset is not
    assert len(data.train) == 8_000 and len(data.test) == 2_000


def test_subset_sizes_cut_like_the_full_set(fashion_mnist_subset):
    """train_size keeps the first training images, heldout_size the last held-out ones, as for the full set."""
    small = data_lib.load("fashion-mnist-subset", train_size=100, heldout_size=30)
    assert torch.equal(small.train.images, fashion_mnist_subset.train.images[:100])
    assert torch.equal(small.heldout.labels, fashion_mnist_subset.heldout.labels[-30:])
    assert torch.equal(small.test.images, fashion_mnist_subset.test.images)
    assert "(100 train / 30 held-out / 2,000 test" in small.source
    for kwargs in ({"train_size": 8_001}, {"heldout_size": 0}):
        with pytest.raises(ValueError, match="subset"):
            data_lib.load("fashion-mnist-subset", **kwargs)


def test_subset_missing_file_is_a_clear_error(tmp_path):
    make_subset.write_subset({split: {"images": np.zeros((2, 28, 28), np.uint8), "labels": np.zeros(2, np.uint8),
                                      "indices": np.arange(2, dtype=np.int32)} for split in SUBSET_TOTALS}, tmp_path)
    assert len(data_lib.load_fashion_mnist_subset(folder=tmp_path).train) == 2
    (tmp_path / "heldout-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data_lib.DatasetNotFoundError, match="heldout-labels-idx1-ubyte.gz.*make_fashion_mnist_subset"):
        data_lib.load_fashion_mnist_subset(folder=tmp_path)


def test_subset_pixels_equal_the_full_files(subset_arrays, full_fashion_mnist):
    for split, (official, _, _) in SUBSET_POOLS.items():
        indices = subset_arrays[split]["indices"]
        np.testing.assert_array_equal(subset_arrays[split]["images"], full_fashion_mnist[f"{official}_images"][indices])
        np.testing.assert_array_equal(subset_arrays[split]["labels"], full_fashion_mnist[f"{official}_labels"][indices])


def test_subset_regenerates_byte_identical(tmp_path, full_fashion_mnist):
    """The script, rerun on the full files, writes the shipped files again (bytes, or content under another zlib)."""
    make_subset.write_subset(make_subset.build_subset(full_fashion_mnist, seed=0), tmp_path)
    problems = make_subset.compare(tmp_path, data_lib.FASHION_MNIST_SUBSET)
    if zlib.ZLIB_RUNTIME_VERSION != make_subset.MADE_WITH_ZLIB:
        problems = [p for p in problems if "same content" not in p and not p.startswith("SHA256SUMS")]
    assert problems == []


def test_subset_compare_names_each_difference(tmp_path):
    def tiny(first_label):
        return {split: {"images": np.full((2, 28, 28), 7, np.uint8), "labels": np.array([first_label, 1], np.uint8),
                        "indices": np.arange(2, dtype=np.int32)} for split in SUBSET_TOTALS}

    make_subset.write_subset(tiny(0), tmp_path / "a")
    make_subset.write_subset(tiny(0), tmp_path / "b")
    assert make_subset.compare(tmp_path / "a", tmp_path / "b") == []
    make_subset.write_subset(tiny(5), tmp_path / "b")
    (tmp_path / "b" / "test-images-idx3-ubyte.gz").write_bytes(  # same content, other compression level
        gzip.compress(gzip.decompress((tmp_path / "a" / "test-images-idx3-ubyte.gz").read_bytes()), compresslevel=1))
    (tmp_path / "b" / "test-indices-idx1-int.gz").unlink()
    problems = make_subset.compare(tmp_path / "a", tmp_path / "b")
    assert {p.split(":")[0] for p in problems if p.endswith("differs")} == {
        "SHA256SUMS", "train-labels-idx1-ubyte.gz", "heldout-labels-idx1-ubyte.gz", "test-labels-idx1-ubyte.gz"}
    assert "test-images-idx3-ubyte.gz: same content, different gzip bytes (another zlib?)" in problems
    assert any(p.startswith("test-indices-idx1-int.gz: missing") for p in problems) and len(problems) == 6


def test_subset_draw_is_stratified_seeded_and_inside_its_pool():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 60_000).astype(np.uint8)
    a = make_subset.draw(labels, "heldout", 20, seed=0)
    assert len(a) == 200 and a.min() >= 50_000 and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a], minlength=10).tolist() == [20] * 10
    assert np.array_equal(a, make_subset.draw(labels, "heldout", 20, seed=0))
    b = make_subset.draw(labels, "heldout", 20, seed=1)
    assert not np.array_equal(a, b) and np.bincount(labels[b], minlength=10).tolist() == [20] * 10
    with pytest.raises(ValueError, match="fewer than"):
        make_subset.draw(labels, "heldout", 5_000, seed=0)


# -- IDX files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(24).reshape(2, 3, 4) * (-1 if np.dtype(dtype).kind != "u" else 1)).astype(dtype)
    path = tmp_path / f"x-idx3{suffix}"
    data_lib.write_idx(path, array)
    back = data_lib.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    raw = data_lib._open_maybe_gz(path).read()
    assert raw[2] == {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
                      np.float32: 0x0D, np.float64: 0x0E}[dtype]
    assert raw[3:16] == bytes([3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])  # ndim, then big-endian sizes


def test_idx_gzip_is_deterministic(tmp_path):
    """No file name and no time stamp in the gzip header: equal arrays give equal files."""
    array = np.arange(1000, dtype=np.int32)
    data_lib.write_idx(tmp_path / "a.gz", array)
    data_lib.write_idx(tmp_path / "b.gz", array)
    a = (tmp_path / "a.gz").read_bytes()
    assert a == (tmp_path / "b.gz").read_bytes()
    assert a[3] & 0x08 == 0 and a[4:8] == b"\0\0\0\0"  # FLG.FNAME unset, MTIME 0
    with pytest.raises(ValueError, match="IDX has no type"):
        data_lib.write_idx(tmp_path / "c", np.arange(3, dtype=np.int64))
    (tmp_path / "d").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        data_lib.read_idx(tmp_path / "d")
