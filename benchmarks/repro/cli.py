"""The command line of ``benchmarks/reproduce.py``: options, the output folder, the data, then the driver."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import data as data_lib
from benchmarks import models as models_lib
from benchmarks import report

from . import config as config_lib
from .distributed import Dist, broadcast_object, launched_by_torchrun, setup_distributed
from .driver import run_all
from .methods import BASE_METHODS, GRAMMAR
from .presets import PRESETS


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Reproduce Novack et al. (ICLR 2023): SB vs LB SGD and the regularizers/grafting that close "
                    "the gap. Writes summary.md, curves.png, metrics.csv, runs.json and config.json.",
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="quick", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/<preset>/<timestamp>)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (first-seed .. first-seed+N-1)")
    p.add_argument("--first-seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods, each {GRAMMAR} (quote it) with BASE one of {' '.join(BASE_METHODS)}, "
                        "e.g. GN 'GN@λ=0.03' 'GN@lambda=0.1-|M|=1024'")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many (method, seed) runs at a time, each in its own worker process (not under "
                        "torchrun)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no run that would end later than SECONDS after the start (estimated from finished "
                        "runs of its kind); finished runs are written at once, --resume continues")
    p.add_argument("--download", action="store_true", help="download the data set through torchvision if absent")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest under results/<preset>/) from its "
                        "checkpoints: finished runs are kept, interrupted ones continue, the rest start")
    p.add_argument("--method", default=None, choices=["exact", "finite_difference"],
                   help="how GN/FT/AJ/UJ differentiate the penalty (default: exact, the paper's double backprop; "
                        "finite_difference is faster but not the paper's penalty on ReLU networks)")
    p.add_argument("--lr", nargs="+", default=None, metavar="[METHOD=]LR", help="learning rates, e.g. SB=0.1 NGD=0.5")
    p.add_argument("--penalty", nargs="+", default=None, metavar="[METHOD=]LAMBDA",
                   help="λ of the methods whose name gives none, e.g. GN=0.01 (a name's @λ= wins)")
    p.add_argument("--batch-size", type=int, default=None, help="|B|")
    p.add_argument("--micro-batch-size", type=int, default=None, help="|M| (also SB's batch size)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None, help="held-out examples per evaluation (0: all)")
    p.add_argument("--test-size", type=int, default=None, help="test examples for the final test accuracy (0: all)")
    p.add_argument("--bn-recalibrate", type=int, default=None,
                   help="training micro-batches to recompute BatchNorm statistics from before each evaluation (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--dataset", default=None, choices=list(data_lib.DATASETS))
    p.add_argument("--data-root", default=None, help="torchvision data root (default ./data)")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on the first N training images (the held-out set stays the last 10,000)")
    p.add_argument("--heldout-size", type=int, default=None, help="held-out images, the last ones (default 10,000)")
    p.add_argument("--compare-bn-eval", action="store_true",
                   help="also evaluate with the running BatchNorm statistics before recalibrating (bn_eval.csv)")
    p.add_argument("--model", default=None, choices=list(models_lib.MODELS))
    p.add_argument("--widths", type=int, nargs="+", default=None, help="small-cnn channel widths")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (per run with --jobs; default there: CPU cores / jobs)")
    p.add_argument("--nondeterministic", action="store_true",
                   help="let cuDNN choose nondeterministic (sometimes faster) algorithms: runs on CUDA are then not "
                        "reproducible bit for bit (across --jobs, --resume or reruns)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--interrupt-after", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    return p


def check_runtime_options(args: argparse.Namespace) -> None:
    """--jobs and --time-budget: valid values; --jobs > 1 is refused under torchrun (before any process group)."""
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and launched_by_torchrun():
        raise SystemExit(f"--jobs {args.jobs} cannot be used under torchrun: there every rank already trains a shard "
                         "of every run together. Use --jobs 1 with torchrun, or --jobs N without torchrun.")
    if args.time_budget is not None and not args.time_budget > 0:
        raise SystemExit(f"--time-budget must be a positive number of seconds, got {args.time_budget}")


def _output_and_config(args: argparse.Namespace, ctx: Dist) -> tuple[Path, dict[str, Any], bool]:
    """--resume: the folder's saved configuration (grown by --methods/--seeds); otherwise the configuration of
    the options, in a new folder. The flag says whether config.json must be (re)written."""
    if not args.resume:
        config = config_lib.build_config(args)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return args.out or Path("results") / config["preset"] / broadcast_object(stamp, ctx), config, True
    out = args.out
    if out is None:
        candidates = sorted((Path("results") / args.preset).glob("*/config.json"))
        if not candidates:
            raise SystemExit(f"--resume: no run under results/{args.preset}/; pass --out")
        out = candidates[-1].parent
    if not (out / "config.json").exists():
        raise SystemExit(f"--resume: {out}/config.json not found")
    saved = json.loads((out / "config.json").read_text())["config"]
    config = resumed_config(args, saved, out)
    return out, config, (config["methods"], config["seeds"]) != (saved["methods"], saved["seeds"])


# What --resume takes besides the saved configuration: where and how to run, not what to compute.
_RUNTIME_OPTIONS = {"preset", "out", "resume", "jobs", "time_budget", "threads", "device", "data_root", "download",
                    "no_progress", "interrupt_after"}


def resumed_config(args: argparse.Namespace, saved: dict[str, Any], out: Path) -> dict[str, Any]:
    """The saved configuration of ``out``, grown by --methods and --seeds, which only add runs (a run depends on
    the configuration, its method and its seed alone, so finished runs stay valid). Any other option that would
    change the saved configuration is refused rather than silently ignored."""
    defaults = vars(make_parser().parse_args([]))
    given = {dest for dest, value in vars(args).items() if value != defaults.get(dest) and dest not in _RUNTIME_OPTIONS}
    if args.preset != defaults["preset"] and args.preset != saved["preset"]:
        raise SystemExit(f"--resume: {out} holds preset {saved['preset']!r}, not {args.preset!r}")

    def configured(options: set[str]) -> dict[str, Any]:  # the preset with only these options applied
        namespace = argparse.Namespace(**{**defaults, **{d: getattr(args, d) for d in options}})
        namespace.preset, namespace.methods = saved["preset"], saved["methods"]
        return config_lib.build_config(namespace)

    base, asked = configured(set()), configured(given - {"methods", "seeds"})
    changed = {key for key in asked if asked[key] != base[key]}
    changed |= {key for key, dest in config_lib.OVERRIDES.items() if dest in given}
    conflicts = sorted(key for key in changed - {"seeds", "resolved"} if asked[key] != saved.get(key))
    if conflicts:
        raise SystemExit(f"--resume continues {out} as configured there; these options would change it: "
                         + ", ".join(f"{key} (saved {saved.get(key)!r}, given {asked[key]!r})" for key in conflicts)
                         + ". Only --methods and --seeds may add runs; start a new --out for the rest.")
    config = dict(saved)
    if args.data_root is not None:  # where the data is now: not what it is
        config["data_root"] = args.data_root
    if args.methods:
        config["methods"] = saved["methods"] + [m for m in args.methods if m not in saved["methods"]]
    if args.seeds is not None:
        if args.seeds < int(saved["seeds"]):
            raise SystemExit(f"--resume: {out} has {saved['seeds']} seeds; --seeds can add seeds, not drop them")
        config["seeds"] = args.seeds
    config_lib.validate(config)  # canonical names (duplicates of saved methods merge), resolved hyperparameters
    return config


def _threads(args: argparse.Namespace, config: dict[str, Any], device: torch.device) -> int | None:
    """Torch CPU threads per run: --threads, else the preset's (CPU), else with --jobs an equal share of the cores."""
    threads = args.threads or (config.get("cpu_threads") if device.type == "cpu" else None)
    if threads is None and args.jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
    return threads


def _load_data(config: dict[str, Any]) -> data_lib.DataSplits:
    try:
        return config_lib.load_data(config)
    except data_lib.DatasetNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:  # e.g. --train-size larger than the data set
        raise SystemExit(f"error: {config['dataset']}: {err}") from None


def main(argv: Sequence[str] | None = None) -> Path:
    started = time.monotonic()
    args = make_parser().parse_args(argv)
    check_runtime_options(args)
    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx, device = setup_distributed(device_kind)
    out, config, write_config = _output_and_config(args, ctx)
    config["device"] = device_kind
    threads = _threads(args, config, device)
    if threads:
        torch.set_num_threads(threads)
    data = _load_data(config)
    config["data_source"] = config_lib.data_source(data)
    env = config_lib.environment(device, ctx.world_size, args.jobs, threads)
    config["device_name"] = env["device_name"]
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if write_config:
            report.write_json(out / "config.json", {"config": config, "environment": env})
        print(f"preset {config['preset']}: {config.get('description', '')}\n"
              f"data {data.name}: {config['data_source']}: train {len(data.train)}, held-out {len(data.heldout)}, "
              f"test {len(data.test)}; penalty gradients {config['grad_method']}; device {env['device_name']}; "
              f"world size {ctx.world_size}\noutput {out}", file=sys.stderr)
    run_all(config, data, device, ctx, out, jobs=args.jobs, threads=threads, progress=not args.no_progress,
            time_budget=args.time_budget, start=started, interrupt_after=args.interrupt_after)
    if ctx.is_main:
        if (out / "summary.md").exists():
            print((out / "summary.md").read_text())
        print(f"wrote {out}/summary.md, curves.png, metrics.csv, runs.json, config.json", file=sys.stderr)
    return out
