"""Data sets for the reproduction benchmark, held on the device as tensors.

Every data set is loaded once into uint8 image tensors (N, C, H, W) and int64 labels, split
into train / held-out / test, and moved to the training device. A training batch is cut
from the train tensors by index and augmented there, batched, on the device (random crop
with zero padding and horizontal flip for CIFAR), then normalized: there is no per-sample
Python work in the training loop.

| data set | train | held-out (model selection) | test (reported) |
|---|---|---|---|
| Fashion-MNIST | first 50,000 training images | last 10,000 training images | official 10,000 |
| Fashion-MNIST subset (embedded) | 8,000 of the first 50,000 | 2,000 of the last 10,000 | 2,000 of the 10,000 |
| CIFAR-10 / CIFAR-100 | first 40,000 training images | last 10,000 training images | official 10,000 |
| synthetic | generated (for tests and smoke runs) | generated | generated |

The Fashion-MNIST subset ships in ``benchmarks/fashion_mnist_subset/`` (MIT, Zalando SE; 800 /
200 / 200 images per class, drawn by ``benchmarks/make_fashion_mnist_subset.py``): it needs no
download and no data package, so the ``quick`` preset runs the same everywhere.

The full Fashion-MNIST is read from the IDX files (``train-images-idx3-ubyte[.gz]`` etc.),
looked for, in order, in ``--data-root`` (``root``) when given, in ``$REGOPT_DATA``, in
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package) and in
torchvision's default root ``./data`` (``<root>/FashionMNIST/raw``). CIFAR is read from
torchvision's folder layout (``<root>/cifar-10-batches-py``, ``<root>/cifar-100-python``)
under ``--data-root``, ``$REGOPT_DATA`` or ``./data``: each pickle is unpickled here only after
its MD5 matches the sum torchvision publishes for it (``CIFAR_MD5``), so a file planted in a
user-chosen folder cannot run code (``DatasetIntegrityError`` otherwise). Nothing is
downloaded unless ``download=True``, which goes through torchvision. ``DataSplits.source``
says in words where the data came from.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("fashion-mnist", "fashion-mnist-subset", "cifar10", "cifar100", "synthetic")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path("data")
FASHION_MNIST_SUBSET = Path(__file__).resolve().parent / "fashion_mnist_subset"
# Images per class in each split of the embedded subset (10 classes: 8,000 / 2,000 / 2,000).
SUBSET_PER_CLASS = {"train": 800, "heldout": 200, "test": 200}

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Per-channel mean and std of the training images (in [0, 1]), as commonly used.
NORMALIZATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5,), (0.25,)),
}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# The published MD5 of every CIFAR pickle read here: a copy of the sums in torchvision.datasets.CIFAR10 and
# CIFAR100 (train_list + test_list), which torchvision checks its downloads against; a test checks the copy
# against torchvision's. A copy, not an import, so that reading CIFAR needs torchvision only to download it.
CIFAR_MD5 = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}


class DatasetNotFoundError(FileNotFoundError):
    """The data set is not on this machine; the message says where we looked and how to get it."""


class DatasetIntegrityError(ValueError):
    """A data file whose checksum is not the published one: it was not unpickled."""


# -- splits on the device -------------------------------------------------------------------
@dataclass
class Split:
    """uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class DataSplits:
    """Train / held-out / test splits of one data set and the transform of a training batch."""

    name: str
    train: Split
    heldout: Split
    test: Split
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: bool = False  # random crop (padding 4) + horizontal flip on training batches
    padding: int = 4
    source: str = ""  # where the data came from, in words (printed in the run's summary and config.json)
    _mean: Tensor | None = field(default=None, repr=False)
    _std: Tensor | None = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.train.images.device

    def to(self, device: torch.device | str) -> "DataSplits":
        return DataSplits(self.name, self.train.to(device), self.heldout.to(device), self.test.to(device),
                          self.num_classes, self.mean, self.std, self.augment, self.padding, self.source)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float32, scaled to [0, 1] and normalized per channel."""
        if self._mean is None or self._mean.device != images.device:
            shape = (1, -1, 1, 1)
            self._mean = torch.tensor(self.mean, device=images.device).view(shape)
            self._std = torch.tensor(self.std, device=images.device).view(shape)
        return (images.float() / 255.0 - self._mean) / self._std

    def train_batch(self, indices: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The training examples at ``indices``, augmented (if the data set is) and normalized."""
        indices = indices.to(self.device)
        images = self.train.images[indices]
        if self.augment:
            images = random_crop_flip(images, self.padding, generator)
        return self.normalize(images), self.train.labels[indices]

    def eval_batches(self, split: str, batch_size: int = 1000, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalized, unaugmented batches of ``split`` ("train", "heldout" or "test"), in order."""
        data: Split = getattr(self, split)
        n = len(data) if limit is None else min(limit, len(data))
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield self.normalize(data.images[start:stop]), data.labels[start:stop]


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Batched RandomCrop(size, padding, fill 0) + RandomHorizontalFlip on uint8 (N, C, H, W) images.

    One offset pair and one flip per image, drawn on the images' device from ``generator``.
    """
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h, device=device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C): advanced dims first
    return out.permute(0, 3, 1, 2).contiguous()


# -- batch order ------------------------------------------------------------------------------
class EpochSampler:
    """Batches of ``batch_size`` indices, each epoch a fresh permutation; the last partial batch is dropped.

    The permutation of epoch e depends only on (seed, e), so the position (epoch, batch index)
    is the whole state and a resumed run sees the same batches. Under torch.distributed every
    rank draws the same global batch and keeps its own contiguous shard (:meth:`shard`).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if batch_size > num_examples:
            raise ValueError(f"batch size {batch_size} exceeds the {num_examples} training examples")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = num_examples // batch_size
        self.epoch = 0
        self.index = 0
        self._perm: Tensor | None = None

    def _permutation(self) -> Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(1_000_003 * self.seed + self.epoch)
            self._perm = torch.randperm(self.num_examples, generator=g)
        return self._perm

    def next(self) -> Tensor:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        start = self.index * self.batch_size
        batch = self._permutation()[start:start + self.batch_size]
        self.index += 1
        return batch

    @staticmethod
    def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
        """This rank's contiguous part of the global batch (so the micro-batches line up with one process)."""
        return indices.tensor_split(world_size)[rank] if world_size > 1 else indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._perm = int(state["epoch"]), int(state["index"]), None


# -- IDX files -----------------------------------------------------------------------------------
# IDX type codes (big-endian payload), as defined with the MNIST files.
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), e.g. images (N, H, W) or labels (N,), in native byte order."""
    with _open_maybe_gz(path) as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype = IDX_DTYPES[dtype_code]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {data.size}")
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64) as an IDX file, gzipped if ``path`` ends
    in .gz. The gzip stream holds no name and no time stamp, so equal arrays give equal files (same zlib)."""
    array = np.asarray(array)
    code = next((c for c, d in IDX_DTYPES.items() if d.kind == array.dtype.kind and d.itemsize == array.dtype.itemsize),
                None)
    if code is None:
        raise ValueError(f"IDX has no type for {array.dtype}")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if Path(path).suffix != ".gz":
        Path(path).write_bytes(raw)
        return
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
        gz.write(raw)


# -- where the full data sets are looked for ---------------------------------------------------------
def _given_roots(root: str | Path | None) -> list[tuple[Path, str]]:
    """The folders the user named, in order (--data-root before $REGOPT_DATA), each with how it was named."""
    roots: list[tuple[Path, str]] = []
    if root is not None:
        roots.append((Path(root).expanduser(), f"--data-root {root}"))
    env = os.environ.get("REGOPT_DATA")
    if env:
        roots.append((Path(env).expanduser(), f"$REGOPT_DATA={env}"))
    return roots


def _default_root(root: str | Path | None) -> list[tuple[Path, str]]:
    """torchvision's default root ./data, searched only when no --data-root is given."""
    return [] if root is not None else [(DEFAULT_ROOT, f"torchvision's default root {_shown(DEFAULT_ROOT)}")]


def _shown(path: Path) -> str:
    """A relative path as ./path (it is relative to the working directory), an absolute one as is."""
    return str(path) if path.is_absolute() else f"./{path}"


def _unique(places: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """Each folder once, where it first occurs."""
    first: dict[Path, str] = {}
    for folder, how in places:
        first.setdefault(folder, how)
    return list(first.items())


# -- Fashion-MNIST ------------------------------------------------------------------------------
def fashion_mnist_locations(root: str | Path | None = None) -> list[tuple[Path, str]]:
    """The folders searched for the full Fashion-MNIST IDX files, in order, each with how it came to be searched:
    ``root`` (--data-root), $REGOPT_DATA, Debian's folder, torchvision's default root ./data."""
    def layouts(base: Path) -> list[Path]:
        return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]

    places = [(folder, how) for base, how in _given_roots(root) for folder in layouts(base)]
    places.append((DEBIAN_FASHION_MNIST, "Debian dataset-fashion-mnist"))
    places += [(folder, how) for base, how in _default_root(root) for folder in layouts(base)]
    return _unique(places)


def fashion_mnist_candidates(root: str | Path | None = None) -> list[Path]:
    """The folders searched for the Fashion-MNIST IDX files, in order."""
    return [folder for folder, _ in fashion_mnist_locations(root)]


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def locate_fashion_mnist(root: str | Path | None = None) -> tuple[dict[str, Path], str]:
    """The four IDX files from the first folder that holds them all and where they came from (in words),
    or DatasetNotFoundError saying which of the ways to provide them to use."""
    places = fashion_mnist_locations(root)
    for folder, how in places:
        files = {key: _find_idx(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(files.values()):
            return files, f"Fashion-MNIST from {folder} ({how})"  # type: ignore[return-value]
    looked = "\n".join(f"  - {folder}   ({how})" for folder, how in places)
    raise DatasetNotFoundError(
        "Fashion-MNIST (the full set) not found. Looked for train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in:\n"
        f"{looked}\n"
        "Provide it in one of these ways (looked up in this order):\n"
        "  1. --data-root DIR or $REGOPT_DATA=DIR: a folder DIR holding the four files "
        "(or DIR/fashion-mnist/, DIR/FashionMNIST/raw/)\n"
        "  2. sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)\n"
        f"  3. torchvision's root: the files in {_shown(DEFAULT_ROOT / 'FashionMNIST' / 'raw')}/ "
        "(where torchvision.datasets.FashionMNIST puts them)\n"
        "  4. rerun with --download   (torchvision downloads it into --data-root, default ./data)\n"
        "The `quick` preset needs none of these: it always runs on the embedded subset "
        "(data set fashion-mnist-subset, benchmarks/fashion_mnist_subset/)."
    )


def find_fashion_mnist(root: str | Path | None = None) -> dict[str, Path]:
    """The four IDX files from the first folder that holds them all, or DatasetNotFoundError."""
    return locate_fashion_mnist(root)[0]


def _split_train(images: Tensor, labels: Tensor, train_size: int, heldout_size: int) -> tuple[Split, Split]:
    """First ``train_size`` examples for training, last ``heldout_size`` held out (they must not overlap)."""
    n = len(labels)
    if not (0 < train_size and 0 < heldout_size and train_size + heldout_size <= n):
        raise ValueError(f"train_size ({train_size}) + heldout_size ({heldout_size}) must be positive and at most "
                         f"the {n} training images")
    return Split(images[:train_size], labels[:train_size]), Split(images[n - heldout_size:], labels[n - heldout_size:])


def load_fashion_mnist(root: str | Path | None = None, download: bool = False,
                       train_size: int = 50_000, heldout_size: int = 10_000) -> DataSplits:
    """Fashion-MNIST: train on the first ``train_size`` training images, hold out the last ``heldout_size``,
    test on the official test set."""
    try:
        files, source = locate_fashion_mnist(root)
    except DatasetNotFoundError:
        if not download:
            raise
        import torchvision

        target = Path(root).expanduser() if root is not None else DEFAULT_ROOT
        for train in (True, False):
            torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        files = find_fashion_mnist(target)
        source = f"Fashion-MNIST downloaded by torchvision to {files['train_images'].parent}"
    images = torch.from_numpy(read_idx(files["train_images"]).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(files["train_labels"]).astype(np.int64))
    test_images = torch.from_numpy(read_idx(files["test_images"]).copy()).unsqueeze(1)
    test_labels = torch.from_numpy(read_idx(files["test_labels"]).astype(np.int64))
    train, heldout = _split_train(images, labels, train_size, heldout_size)
    mean, std = NORMALIZATION["fashion-mnist"]
    return DataSplits(
        "fashion-mnist", train, heldout, Split(test_images, test_labels),
        num_classes=10, mean=mean, std=std, augment=False, source=source,
    )


# -- the embedded Fashion-MNIST subset -------------------------------------------------------------
def subset_files(split: str, folder: Path | None = None) -> dict[str, Path]:
    """The images, labels and original indices of one split ("train", "heldout", "test") of the subset.

    Indices count from 0 in the official training set (train, heldout) or test set (test)."""
    folder = FASHION_MNIST_SUBSET if folder is None else Path(folder)
    return {"images": folder / f"{split}-images-idx3-ubyte.gz", "labels": folder / f"{split}-labels-idx1-ubyte.gz",
            "indices": folder / f"{split}-indices-idx1-int.gz"}


def read_fashion_mnist_subset(folder: Path | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The subset's arrays, {split: {"images": (N, 28, 28) uint8, "labels": (N,) uint8, "indices": (N,) int32}}."""
    arrays = {}
    for split in SUBSET_PER_CLASS:
        files = subset_files(split, folder)
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"the embedded Fashion-MNIST subset is incomplete: missing {', '.join(missing)}. It ships with the "
                "repository (benchmarks/fashion_mnist_subset/); restore it from git, or regenerate it from the full "
                "files with python benchmarks/make_fashion_mnist_subset.py")
        arrays[split] = {key: read_idx(path) for key, path in files.items()}
    return arrays


def load_fashion_mnist_subset(train_size: int | None = None, heldout_size: int | None = None,
                              folder: Path | None = None) -> DataSplits:
    """The embedded subset (8,000 train / 2,000 held-out / 2,000 test, stratified by class), normalized as the
    full Fashion-MNIST. Train on its first ``train_size`` training images, hold out its last ``heldout_size``."""
    arrays = read_fashion_mnist_subset(folder)

    def split(name: str) -> Split:
        images = torch.from_numpy(arrays[name]["images"].copy()).unsqueeze(1)
        return Split(images, torch.from_numpy(arrays[name]["labels"].astype(np.int64)))

    train, heldout, test = split("train"), split("heldout"), split("test")
    for size, part, name in ((train_size, train, "train_size"), (heldout_size, heldout, "heldout_size")):
        if size is not None and not 0 < size <= len(part):
            raise ValueError(f"{name} ({size}) must be positive and at most the subset's {len(part)}")
    if train_size is not None:
        train = Split(train.images[:train_size], train.labels[:train_size])
    if heldout_size is not None:
        heldout = Split(heldout.images[-heldout_size:], heldout.labels[-heldout_size:])
    mean, std = NORMALIZATION["fashion-mnist"]
    where = FASHION_MNIST_SUBSET if folder is None else Path(folder)
    source = (f"embedded Fashion-MNIST subset ({len(train):,} train / {len(heldout):,} held-out / {len(test):,} test, "
              f"{_relative(where)})")
    return DataSplits("fashion-mnist-subset", train, heldout, test, num_classes=10, mean=mean, std=std,
                      augment=False, source=source)


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (benchmarks/...), absolute otherwise."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return str(path)


# -- CIFAR ------------------------------------------------------------------------------------
def cifar_locations(name: str, root: str | Path | None = None) -> list[tuple[Path, str]]:
    """The folders searched for CIFAR ``name``, in order (--data-root, $REGOPT_DATA, ./data), each with its origin."""
    folder = CIFAR_FOLDERS[name]
    return _unique([(base / folder, how) for base, how in _given_roots(root) + _default_root(root)])


def cifar_candidates(name: str, root: str | Path | None = None) -> list[Path]:
    return [folder for folder, _ in cifar_locations(name, root)]


def _cifar_files(name: str) -> tuple[list[str], list[str], str]:
    if name == "cifar10":
        return [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    return ["train"], ["test"], "fine_labels"


def _verified_cifar_bytes(dataset: str, path: Path) -> bytes:
    """The bytes of CIFAR pickle ``path`` once their MD5 is the published one, else DatasetIntegrityError.

    The bytes checked are the bytes unpickled (read once), so the file cannot change in between."""
    raw = path.read_bytes()
    expected = CIFAR_MD5[dataset][path.name]
    actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if actual != expected:
        tv = "CIFAR10" if dataset == "cifar10" else "CIFAR100"
        raise DatasetIntegrityError(
            f"{path}: MD5 {actual} does not match the published {expected} (torchvision.datasets.{tv}); "
            "the file is damaged or not the official one, and was not unpickled (a pickle can run code). "
            f"Fix: delete {path.parent} and rerun with --download, or point --data-root at the official files."
        )
    return raw


def _load_cifar_pickles(dataset: str, folder: Path, names: list[str],
                        label_key: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in names:
        entry = pickle.loads(_verified_cifar_bytes(dataset, folder / name), encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def locate_cifar(name: str, root: str | Path | None = None) -> tuple[Path, str]:
    """The folder of CIFAR ``name`` and where it came from (in words), or DatasetNotFoundError."""
    train, test, _ = _cifar_files(name)
    places = cifar_locations(name, root)
    for folder, how in places:
        if all((folder / f).is_file() for f in train + test):
            return folder, f"{_CIFAR_TITLES[name]} from {folder} ({how})"
    looked = "\n".join(f"  - {folder}   ({how})" for folder, how in places)
    tv = "CIFAR10" if name == "cifar10" else "CIFAR100"
    raise DatasetNotFoundError(
        f"{name.upper()} not found (torchvision's python-pickle layout: {', '.join(train + test)}). Looked in:\n"
        f"{looked}\nGet it by rerunning with --download (torchvision.datasets.{tv} downloads it into --data-root), "
        "or point --data-root or $REGOPT_DATA at the folder that holds "
        f"{CIFAR_FOLDERS[name]}/."
    )


def find_cifar(name: str, root: str | Path | None = None) -> Path:
    return locate_cifar(name, root)[0]


def load_cifar(name: str, root: str | Path | None = None, download: bool = False,
               train_size: int = 40_000, heldout_size: int = 10_000) -> DataSplits:
    """CIFAR-10/100 with the paper's split: first ``train_size`` training images, the last ``heldout_size`` held out."""
    if name not in CIFAR_FOLDERS:
        raise ValueError(f"unknown CIFAR data set {name!r}")
    try:
        folder, source = locate_cifar(name, root)
    except DatasetNotFoundError:
        if not download:
            raise
        import torchvision

        target = Path(root).expanduser() if root is not None else DEFAULT_ROOT
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(target), train=True, download=True)
        folder = find_cifar(name, target)
        source = f"{_CIFAR_TITLES[name]} downloaded by torchvision to {folder}"
    train_files, test_files, label_key = _cifar_files(name)
    images, labels = _load_cifar_pickles(name, folder, train_files, label_key)
    test_images, test_labels = _load_cifar_pickles(name, folder, test_files, label_key)
    train, heldout = _split_train(images, labels, train_size, heldout_size)
    mean, std = NORMALIZATION[name]
    return DataSplits(
        name, train, heldout, Split(test_images, test_labels),
        num_classes=10 if name == "cifar10" else 100, mean=mean, std=std, augment=True, source=source,
    )


# -- synthetic ----------------------------------------------------------------------------------
def make_synthetic(num_train: int = 512, num_heldout: int = 256, num_test: int = 256, num_classes: int = 10,
                   shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0, augment: bool = False) -> DataSplits:
    """A learnable toy problem: one random template per class plus noise, as uint8 images."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand((num_classes, *shape), generator=g)
    total = num_train + num_heldout + num_test
    labels = torch.randint(0, num_classes, (total,), generator=g)
    images = 0.6 * templates[labels] + 0.4 * torch.rand((total, *shape), generator=g)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    a, b = num_train, num_train + num_heldout
    mean, std = NORMALIZATION["synthetic"]
    channels = shape[0]
    return DataSplits(
        "synthetic", Split(images[:a], labels[:a]), Split(images[a:b], labels[a:b]), Split(images[b:], labels[b:]),
        num_classes=num_classes, mean=mean * channels, std=std * channels, augment=augment,
        source=f"synthetic (generated, seed {seed})",
    )


def load(name: str, root: str | Path | None = None, download: bool = False, **kwargs) -> DataSplits:
    """Load data set ``name`` (one of DATASETS) on the CPU; move it with ``.to(device)``."""
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download, **kwargs)
    if name == "fashion-mnist-subset":  # embedded: root and download do not apply
        return load_fashion_mnist_subset(**kwargs)
    if name in CIFAR_FOLDERS:
        return load_cifar(name, root, download, **kwargs)
    if name == "synthetic":
        return make_synthetic(**kwargs)
    raise ValueError(f"unknown data set {name!r} (expected one of {', '.join(DATASETS)})")
