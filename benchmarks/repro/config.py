"""Command-line options → the configuration of one reproduction (a preset plus overrides), and its data."""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import math
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import regopt
from benchmarks import data as data_lib

from .methods import parse_method, resolve_hyperparameters, run_order
from .presets import DEFAULTS, PRESETS


def assignment_value(item: str) -> float:
    """The VALUE of a ``[METHOD=]VALUE`` item (after the last "="): a finite number >= 0, a learning rate or a λ.
    ValueError says why not."""
    value = item.rpartition("=")[2]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a number (expected METHOD=VALUE or VALUE)") from None
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"expected a finite number >= 0, got {value!r}")
    return number


def parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, float]:
    """``["SB=0.1", "0.05", "GN@lambda=0.03=0.2"]`` -> {"SB": 0.1, "default": 0.05, "GN@λ=0.03": 0.2}.

    The key is everything before the last "=", a method name (canonicalized) or nothing ("default"); the value
    as :func:`assignment_value` reads it. SystemExit naming ``--what`` and the item when one does not read."""
    out: dict[str, float] = {}
    for item in items or []:
        key = item.rpartition("=")[0]
        try:
            out[parse_method(key).name if key else "default"] = assignment_value(item)
        except ValueError as err:
            raise SystemExit(f"--{what} {item!r}: {err}") from None
    return out


OVERRIDES = {  # config key: argparse destination
    "dataset": "dataset", "model": "model", "batch_size": "batch_size", "micro_batch_size": "micro_batch_size",
    "steps": "steps", "eval_every": "eval_every", "eval_size": "eval_size", "seeds": "seeds", "momentum": "momentum",
    "weight_decay": "weight_decay", "grad_method": "method", "bn_recalibrate": "bn_recalibrate",
    "checkpoint_every": "checkpoint_every", "data_root": "data_root", "train_size": "train_size",
    "heldout_size": "heldout_size", "first_seed": "first_seed",
}


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset named by ``args.preset`` with every option the command line gives; validated and resolved."""
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    config = copy.deepcopy(DEFAULTS)
    config.update(copy.deepcopy(preset))
    config["preset"] = args.preset
    config.update({key: getattr(args, dest) for key, dest in OVERRIDES.items() if getattr(args, dest) is not None})
    if args.compare_bn_eval:
        config["compare_bn_eval"] = True
    if args.nondeterministic:
        config["deterministic"] = False
    if args.eval_size is not None and args.eval_size <= 0:
        config["eval_size"] = None
    if args.test_size is not None:
        config["test_size"] = args.test_size if args.test_size > 0 else None
    if args.widths:
        config["model_kwargs"] = {**config["model_kwargs"], "widths": args.widths}
    if args.dataset is not None and args.dataset != preset["dataset"]:
        config["paper_test_acc"] = None
        for key in ("train_size", "heldout_size"):  # the preset's split sizes are for its own data set
            config[key] = getattr(args, key)
    if args.model is not None and args.model != preset["model"]:
        config["model_kwargs"] = {"widths": args.widths} if args.widths else {}
    if config["dataset"] == "synthetic":
        config["synthetic"] = config.get("synthetic") or {}
    if args.methods:
        config["methods"] = list(args.methods)
    config["lr"] = {**config["lr"], **parse_assignments(args.lr, "lr")}
    config["penalty"] = {**config["penalty"], **parse_assignments(args.penalty, "penalty")}
    config["download"] = bool(args.download)
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    """Refuse what cannot run (SystemExit with the reason); canonicalize the methods, resolve their hyperparameters."""
    for key in ("batch_size", "micro_batch_size", "steps", "eval_every", "seeds"):
        if int(config[key]) < 1:
            raise SystemExit(f"{key} must be >= 1, got {config[key]}")
    if config["grad_method"] not in ("exact", "finite_difference"):
        raise SystemExit(f"--method must be 'exact' or 'finite_difference', got {config['grad_method']!r}")
    if config["dataset"] not in data_lib.DATASETS:
        raise SystemExit(f"unknown data set {config['dataset']!r}: this checkout's benchmarks/data.py offers "
                         f"{', '.join(data_lib.DATASETS)}")
    try:
        specs = run_order(config["methods"])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    config["methods"] = [s.name for s in specs]
    config["resolved"] = {s.name: resolve_hyperparameters(config, s) for s in specs}


def seeds(config: dict[str, Any]) -> list[int]:
    first = int(config.get("first_seed") or 0)
    return list(range(first, first + int(config["seeds"])))


def load_data(config: dict[str, Any]) -> data_lib.DataSplits:
    """The configured data set on the CPU (move it with ``.to(device)``)."""
    kwargs: dict[str, Any] = {}
    if config["dataset"] == "synthetic":
        kwargs = dict(config.get("synthetic") or {})
        if "shape" in kwargs:
            kwargs["shape"] = tuple(kwargs["shape"])
        return data_lib.load("synthetic", **kwargs)
    for key in ("train_size", "heldout_size"):
        if config.get(key):
            kwargs[key] = int(config[key])
    return data_lib.load(config["dataset"], config.get("data_root"), config.get("download", False), **kwargs)


def data_source(data: data_lib.DataSplits) -> str:
    """Where the data came from, in words (DataSplits.source; the data set's name where a loader gives none)."""
    return getattr(data, "source", "") or data.name


def environment(device: torch.device, world_size: int, jobs: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Versions, device, platform, git commit, command line and date: what config.json records beside the config.
    ``jobs`` runs at a time (--jobs), each on ``threads`` CPU threads (default: this process's)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "regopt": regopt.__version__}
    for name in ("torchvision", "numpy", "matplotlib", "tqdm"):
        try:  # the installed version, without importing the package (torchvision's import alone takes seconds)
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    at_a_time = f", {jobs} runs at a time" if jobs > 1 else ""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device) + at_a_time
    else:
        per_run = " per run" if jobs > 1 else ""
        device_name = (f"cpu ({platform.processor() or platform.machine()}, "
                       f"{threads or torch.get_num_threads()} threads{per_run}{at_a_time})")
    return {"versions": versions, "device_name": device_name, "platform": platform.platform(),
            "git_commit": commit, "world_size": world_size, "jobs": jobs, "argv": sys.argv,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
