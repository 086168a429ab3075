"""Regenerate the embedded Fashion-MNIST subset (benchmarks/fashion_mnist_subset/) from the full files.

    python benchmarks/make_fashion_mnist_subset.py            # full files found as benchmarks/data.py finds them
    python benchmarks/make_fashion_mnist_subset.py --source /usr/share/datasets/fashion-mnist --out DIR
    python benchmarks/make_fashion_mnist_subset.py --check    # regenerate in a temporary folder and compare

The draw, stratified by class, with seed s (default 0):

| split | pool (original indices) | per class | total |
|---|---|---|---|
| train | official training set 0 .. 49,999 | 800 | 8,000 |
| heldout | official training set 50,000 .. 59,999 | 200 | 2,000 |
| test | official test set 0 .. 9,999 | 200 | 2,000 |

so the subset keeps the protocol of the full set (train on the first 50,000, select on the last
10,000, report on the test set). Within a pool the images of each class are ranked by
SHA-256("fashion-mnist-subset:<s>:<split>:<index>") and the first ``per class`` kept; a split is
stored in increasing original index. A hash ranking, not numpy's or torch's generator, because
its draw cannot change with a library version (numpy's Generator promises no stream stability
across versions): the same full files give the same subset, byte for byte with the same zlib.

Written per split: ``<split>-images-idx3-ubyte.gz`` (N, 28, 28) uint8, ``<split>-labels-idx1-ubyte.gz``
(N,) uint8 and ``<split>-indices-idx1-int.gz`` (N,) int32, the original indices; and SHA256SUMS
(``sha256sum -c SHA256SUMS`` checks the files). README.md and LICENSE in that folder are not generated.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks import data as data_lib

# (official set, first index, stop index) of each split's pool.
POOLS = {"train": ("train", 0, 50_000), "heldout": ("train", 50_000, 60_000), "test": ("test", 0, 10_000)}
# SHA-256 of the decompressed official IDX files (Zalando's release; Debian's dataset-fashion-mnist holds them
# recompressed, so the .gz bytes differ but these do not).
FULL_SHA256 = {
    "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
SUMS_FILE = "SHA256SUMS"
MADE_WITH_ZLIB = "1.2.13"  # the shipped .gz bytes; another zlib may compress the same content differently


def content_sha256(path: Path) -> str:
    """SHA-256 of the file's content, decompressed if it is gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_full(source: Path | None) -> tuple[dict[str, np.ndarray], str]:
    """The four official arrays (checked against FULL_SHA256) and where they were found."""
    if source is None:
        files, where = data_lib.locate_fashion_mnist()
    else:
        files, where = data_lib.find_fashion_mnist(source), str(source)
    for key, path in files.items():
        digest = content_sha256(path)
        if digest != FULL_SHA256[key]:
            raise SystemExit(f"error: {path} is not the official Fashion-MNIST file (content sha256 {digest}, "
                             f"expected {FULL_SHA256[key]}): a different source would give a different subset")
    return {key: data_lib.read_idx(path) for key, path in files.items()}, where


def draw(labels: np.ndarray, split: str, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` original indices of each class from the split's pool, in increasing order (int32)."""
    _, start, stop = POOLS[split]
    chosen: list[int] = []
    for cls in range(10):
        pool = (np.flatnonzero(labels[start:stop] == cls) + start).tolist()
        if len(pool) < per_class:
            raise ValueError(f"{split}: class {cls} has {len(pool)} images in its pool, fewer than {per_class}")
        pool.sort(key=lambda i: hashlib.sha256(f"fashion-mnist-subset:{seed}:{split}:{i}".encode()).digest())
        chosen += pool[:per_class]
    return np.array(sorted(chosen), dtype=np.int32)


def build_subset(full: dict[str, np.ndarray], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """{split: {"images", "labels", "indices"}} drawn from the official arrays."""
    subset = {}
    for split, per_class in data_lib.SUBSET_PER_CLASS.items():
        official = POOLS[split][0]
        indices = draw(full[f"{official}_labels"], split, per_class, seed)
        subset[split] = {"images": full[f"{official}_images"][indices], "labels": full[f"{official}_labels"][indices],
                         "indices": indices}
    return subset


def write_subset(subset: dict[str, dict[str, np.ndarray]], out: Path) -> dict[str, str]:
    """Write the IDX files and SHA256SUMS into ``out``; returns {file name: sha256}."""
    out.mkdir(parents=True, exist_ok=True)
    sums = {}
    for split, arrays in subset.items():
        for key, path in data_lib.subset_files(split, out).items():
            data_lib.write_idx(path, arrays[key])
            sums[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / SUMS_FILE).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def compare(made: Path, shipped: Path) -> list[str]:
    """The differences between a regenerated folder and the shipped one (empty: byte-identical)."""
    problems = []
    for name in [SUMS_FILE] + [p.name for p in sorted(made.glob("*.gz"))]:
        a, b = made / name, shipped / name
        if not b.is_file():
            problems.append(f"{name}: missing from {shipped}")
        elif a.read_bytes() != b.read_bytes():
            same = name.endswith(".gz") and content_sha256(a) == content_sha256(b)
            problems.append(f"{name}: " + ("same content, different gzip bytes (another zlib?)" if same else "differs"))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the embedded Fashion-MNIST subset from the full files.")
    p.add_argument("--source", type=Path, default=None,
                   help="folder of the four official IDX files (default: looked up as benchmarks/data.py does)")
    p.add_argument("--out", type=Path, default=data_lib.FASHION_MNIST_SUBSET, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="regenerate in a temporary folder and compare with --out")
    args = p.parse_args(argv)

    full, where = read_full(args.source)
    subset = build_subset(full, args.seed)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_subset(subset, Path(tmp))
            problems = compare(Path(tmp), args.out)
        print("\n".join(problems) if problems else f"{args.out}: byte-identical to a fresh draw from {where}")
        return 1 if problems else 0
    sums = write_subset(subset, args.out)
    total = sum((args.out / name).stat().st_size for name in sums)
    counts = ", ".join(f"{split} {len(arrays['labels']):,}" for split, arrays in subset.items())
    print(f"wrote {args.out} from {where} (seed {args.seed}): {counts}; {total:,} bytes")
    print((args.out / SUMS_FILE).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
