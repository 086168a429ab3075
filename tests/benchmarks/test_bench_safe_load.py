"""Safe loading of what the reproduction reads back from disk: checkpoints with weights_only=True (--resume),
CIFAR pickles only after their MD5 matches torchvision's published sum."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from benchmarks import data as data_lib
from benchmarks import reproduce
from benchmarks.repro import methods, training
from conftest import make_fake_cifar, trust_fake_cifar

TINY = ["--dataset", "synthetic", "--widths", "4", "8", "--batch-size", "16", "--micro-batch-size", "4",
        "--eval-every", "2", "--eval-size", "0", "--test-size", "0", "--bn-recalibrate", "2", "--no-progress",
        "--threads", "1"]
EVERY_BASE = ["SB", "LB", "GN@λ=0.1", "FT", "AJ", "UJ", "GRAFT-iter", "GRAFT-ext", "NGD"]


class _RunsCode:
    """A pickle payload: unpickling it in full calls exec, which writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _assert_same(loaded, saved):
    """``loaded`` is ``saved`` rebuilt from plain types: same structure, same tensors bit for bit, same scalars."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and loaded.dtype == saved.dtype
        assert torch.equal(loaded, saved.cpu())
    elif isinstance(saved, dict):
        assert isinstance(loaded, dict) and list(loaded) == list(saved)
        for key in saved:
            _assert_same(loaded[key], saved[key])
    elif isinstance(saved, (list, tuple)):
        assert type(loaded) is type(saved) and len(loaded) == len(saved)
        for a, b in zip(loaded, saved):
            _assert_same(a, b)
    else:
        assert type(loaded) is type(saved) and (loaded == saved or loaded != loaded and saved != saved)  # NaN


# -- checkpoints --------------------------------------------------------------------------------
def test_every_checkpoint_a_run_writes_loads_with_weights_only(tmp_path, monkeypatch):
    """Every file version written (partial and final, every method base) reads back with weights_only=True, equal."""
    written = []
    save = training._save_atomic

    def save_and_check(obj, path):
        save(obj, path)
        _assert_same(torch.load(path, weights_only=True), obj)
        written.append((path.name, "done" in obj))

    monkeypatch.setattr(training, "_save_atomic", save_and_check)
    reproduce.main([*TINY, "--steps", "4", "--checkpoint-every", "2", "--out", str(tmp_path / "out"),
                    "--methods", *EVERY_BASE])
    for method in EVERY_BASE:
        name = f"seed0_{methods.safe_name(method)}.pt"
        assert (name, False) in written and (name, True) in written  # a partial and a final checkpoint each


def _plant(path, payload, raw):
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)  # torch.load's default protocol: no warning
    else:
        torch.save(payload, path)


@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "pickle.dump"])
def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path, raw):
    marker = tmp_path / "marker"
    # The payload is live: a full unpickle runs it.
    control = tmp_path / "control.pt"
    _plant(control, {"done": True, "rows": _RunsCode(marker)}, raw)
    pickle.loads(control.read_bytes()) if raw else torch.load(control, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    run_spec = methods.parse_method("SB")
    path = training.checkpoint_path(tmp_path / "out", 0, run_spec)
    _plant(path, {"done": True, "rows": _RunsCode(marker)}, raw)
    with pytest.raises(training.UnsafeCheckpointError) as err:
        training.load_finished(tmp_path / "out", 0, run_spec)
    assert not marker.exists()
    text = str(err.value)
    assert str(path) in text and "not a checkpoint this script wrote" in text and "arbitrary code" in text
    assert "Unsupported global" in text  # torch's reason, without its advice to load it anyway
    assert "weights_only=False" not in text and "add_safe_globals" not in text
    assert isinstance(err.value, pickle.UnpicklingError)


def test_resume_refuses_a_planted_checkpoint_and_runs_nothing(tmp_path):
    """--resume end to end: a malicious file in place of a partial checkpoint stops the run; its code never runs."""
    out = tmp_path / "out"
    reproduce.main([*TINY, "--steps", "2", "--methods", "SB", "LB", "--out", str(out)])
    marker = tmp_path / "marker"
    path = out / "checkpoints" / "seed0_LB.pt"
    _plant(path, {"model": _RunsCode(marker), "step": 1}, raw=False)
    with pytest.raises(training.UnsafeCheckpointError, match="seed0_LB.pt"):
        reproduce.main(["--resume", "--out", str(out), "--no-progress"])
    assert not marker.exists()


# -- CIFAR pickles ------------------------------------------------------------------------------
def test_published_cifar_sums_are_torchvisions():
    """The copy in data.py is exactly the table torchvision's CIFAR classes check downloads against."""
    torchvision = pytest.importorskip("torchvision")
    for name, cls in (("cifar10", torchvision.datasets.CIFAR10), ("cifar100", torchvision.datasets.CIFAR100)):
        assert data_lib.CIFAR_MD5[name] == dict(cls.train_list + cls.test_list)
        train, test, _ = data_lib._cifar_files(name)
        assert sorted(data_lib.CIFAR_MD5[name]) == sorted(train + test)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_tampered_cifar_file_is_refused_before_unpickling(tmp_path, name):
    """The published sums, unpatched: a planted pickle with the right name but not the right bytes never runs."""
    make_fake_cifar(tmp_path, name)
    folder = tmp_path / data_lib.CIFAR_FOLDERS[name]
    target = folder / ("data_batch_1" if name == "cifar10" else "train")
    marker = tmp_path / "marker"
    with open(target, "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    actual = hashlib.md5(target.read_bytes()).hexdigest()
    with pytest.raises(data_lib.DatasetIntegrityError) as err:
        data_lib.load(name, root=tmp_path, train_size=4, heldout_size=2)
    assert not marker.exists()
    text = str(err.value)
    assert str(target) in text and actual in text and data_lib.CIFAR_MD5[name][target.name] in text
    assert "--download" in text and "--data-root" in text
    assert isinstance(err.value, ValueError)  # the CLI turns ValueError from loading into a clean exit


def test_a_cifar_file_whose_md5_matches_is_loaded(tmp_path, monkeypatch):
    """Acceptance goes by the bytes: a file loads exactly when its MD5 is the expected one, whoever computed it."""
    train, _, _, _ = make_fake_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    sums = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    monkeypatch.setitem(data_lib.CIFAR_MD5, "cifar10", {k: sums[k] for k in data_lib.CIFAR_MD5["cifar10"]})
    splits = data_lib.load("cifar10", root=tmp_path, train_size=20, heldout_size=10)
    assert torch.equal(splits.train.images, torch.from_numpy(train[:20]))
    with open(folder / "test_batch", "ab") as f:  # one byte more: the sum no longer matches
        f.write(b"\0")
    with pytest.raises(data_lib.DatasetIntegrityError, match="test_batch"):
        data_lib.load("cifar10", root=tmp_path, train_size=20, heldout_size=10)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_cifar_files_pass_the_published_sums(name):
    """Where the official files are on this machine (--data-root-less lookup: $REGOPT_DATA, ./data), they pass."""
    try:
        folder = data_lib.find_cifar(name)
    except data_lib.DatasetNotFoundError:
        pytest.skip(f"official {name} files not on this machine")
    for file in data_lib.CIFAR_MD5[name]:
        assert data_lib._verified_cifar_bytes(name, folder / file)


def test_trust_fake_cifar_is_what_lets_fake_files_through(tmp_path, monkeypatch):
    """The test-only route past the check (conftest.trust_fake_cifar) is needed, and scoped to the test."""
    make_fake_cifar(tmp_path, "cifar100", per_batch=30)
    with pytest.raises(data_lib.DatasetIntegrityError):
        data_lib.load("cifar100", root=tmp_path, train_size=20, heldout_size=10)
    published = dict(data_lib.CIFAR_MD5["cifar100"])
    with monkeypatch.context() as patch:
        trust_fake_cifar(patch, tmp_path, "cifar100")
        assert data_lib.load("cifar100", root=tmp_path, train_size=20, heldout_size=10).num_classes == 100
    assert data_lib.CIFAR_MD5["cifar100"] == published
