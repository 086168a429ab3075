"""Shared fixtures of the benchmark tests: `benchmarks` importable, one CPU thread, the embedded
Fashion-MNIST subset as the real-data fixture, the full files when the machine has them, fake data sets."""

from __future__ import annotations

import hashlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import data as data_lib  # noqa: E402  (needs ROOT on sys.path)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_mnist_subset() -> data_lib.DataSplits:
    """The embedded Fashion-MNIST subset (real images, shipped with the repository): the real-data fixture."""
    return data_lib.load("fashion-mnist-subset")


@pytest.fixture(scope="session")
def full_fashion_mnist() -> dict[str, np.ndarray]:
    """The four official Fashion-MNIST arrays, read from wherever benchmarks/data.py finds them; skips if absent."""
    try:
        files = data_lib.find_fashion_mnist()
    except data_lib.DatasetNotFoundError:
        pytest.skip("full Fashion-MNIST not on this machine (apt-get install dataset-fashion-mnist)")
    return {key: data_lib.read_idx(path) for key, path in files.items()}


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """An unsigned-byte IDX file, as Fashion-MNIST ships them (``path`` + ".gz" when compressed)."""
    data_lib.write_idx(Path(str(path) + ".gz") if compress else path, np.asarray(array, dtype=np.uint8))


def make_fake_fashion_mnist(folder: Path, num_train: int = 30, num_test: int = 10, compress: bool = True,
                            seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, compress)
    return arrays


def make_fake_cifar(root: Path, name: str = "cifar10", per_batch: int = 6, num_test: int = 5,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's python-pickle layout, with tiny batches: returns train/test images (N, 3, 32, 32) and labels."""
    rng = np.random.default_rng(seed)
    classes, label_key = (10, "labels") if name == "cifar10" else (100, "fine_labels")
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    train_images, train_labels = [], []
    for file in train_files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, per_batch).tolist()
        entry = {"data": data, label_key: labels, "filenames": [f"{i}.png" for i in range(per_batch)]}
        if name == "cifar100":
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        with open(folder / file, "wb") as f:
            pickle.dump(entry, f)
        train_images.append(data)
        train_labels += labels
    test = rng.integers(0, 256, (num_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, classes, num_test).tolist()
    entry = {"data": test, label_key: test_labels}
    if name == "cifar100":
        entry["coarse_labels"] = [lab // 5 for lab in test_labels]
    with open(folder / ("test_batch" if name == "cifar10" else "test"), "wb") as f:
        pickle.dump(entry, f)
    meta_name, meta_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(classes)]}, f)
    return (np.concatenate(train_images).reshape(-1, 3, 32, 32), np.array(train_labels),
            test.reshape(-1, 3, 32, 32), np.array(test_labels))


def trust_fake_cifar(monkeypatch: pytest.MonkeyPatch, root: Path, name: str = "cifar10") -> None:
    """TEST ONLY: accept the fake CIFAR files under ``root`` by putting their MD5 sums in place of the published
    ones (data.CIFAR_MD5) for the rest of the test; monkeypatch restores the published table afterwards."""
    folder = root / data_lib.CIFAR_FOLDERS[name]
    sums = {file: hashlib.md5((folder / file).read_bytes()).hexdigest() for file in data_lib.CIFAR_MD5[name]}
    monkeypatch.setitem(data_lib.CIFAR_MD5, name, sums)
