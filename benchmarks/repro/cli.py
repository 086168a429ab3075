"""The command line of ``benchmarks/reproduce.py``: options, the output folder, the data, then the driver."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from benchmarks import data as data_lib
from benchmarks import models as models_lib
from benchmarks import report

from . import config as config_lib
from .distributed import Dist, broadcast_object, launched_by_torchrun, setup_distributed
from .driver import run_all
from .folder import check_new_run, lock_folder
from .methods import BASE_METHODS, GRAMMAR
from .presets import PRESETS
from .training import CheckpointError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where there is a value to show (not None, not a flag's False) and the help
    text does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument error in one line (the usage of ~30 options would bury it): the option, the value, the rule."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, rule: str, accept: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` when finite and ``accept``-ed, else an error stating ``rule``."""

    def read(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
        return value

    return read


POSITIVE_INT = _number(int, "an integer >= 1", lambda v: v >= 1)
NON_NEGATIVE_INT = _number(int, "an integer >= 0", lambda v: v >= 0)
POSITIVE_FLOAT = _number(float, "a finite number > 0", lambda v: v > 0)
NON_NEGATIVE_FLOAT = _number(float, "a finite number >= 0", lambda v: v >= 0)


def _assignment(text: str) -> str:
    """An argparse ``type`` for --lr/--penalty items: ``text`` unchanged once its value reads (a finite number
    >= 0); the method names are read with --methods' (config.build_config)."""
    try:
        config_lib.assignment_value(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return text


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="Reproduce Novack et al. (ICLR 2023): SB vs LB SGD and the regularizers/grafting that close "
                    "the gap. Writes summary.md, curves.png, metrics.csv, runs.json and config.json into --out, "
                    "a new or empty folder (or, with --resume, the run it holds), locked while the run lasts.",
        allow_abbrev=False, formatter_class=_HelpFormatter)
    p.add_argument("--preset", default="quick", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder, new or empty unless --resume (default results/<preset>/<timestamp>)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=None,
                   help="number of seeds, first-seed .. first-seed+N-1 (default: the preset's)")
    p.add_argument("--first-seed", type=NON_NEGATIVE_INT, default=None, help="first seed (default 0)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods, each {GRAMMAR} (quote it) with BASE one of {' '.join(BASE_METHODS)}, "
                        "e.g. GN 'GN@λ=0.03' 'GN@lambda=0.1-|M|=1024' (default: the preset's)")
    p.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="optimizer steps per method (default: the preset's)")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1,
                   help="run this many (method, seed) runs at a time, each in its own worker process (not under "
                        "torchrun)")
    p.add_argument("--time-budget", type=POSITIVE_FLOAT, default=None, metavar="SECONDS",
                   help="start no run that would end later than SECONDS after the start (estimated from finished "
                        "runs of its kind); finished runs are written at once, --resume continues (default: no "
                        "budget)")
    p.add_argument("--download", action="store_true", help="download the data set through torchvision if absent")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest under results/<preset>/) from its "
                        "checkpoints: finished runs are kept, interrupted ones continue, the rest start")
    p.add_argument("--method", default=None, choices=["exact", "finite_difference"],
                   help="how GN/FT/AJ/UJ differentiate the penalty (default: exact, the paper's double backprop; "
                        "finite_difference is faster but not the paper's penalty on ReLU networks)")
    p.add_argument("--lr", nargs="+", type=_assignment, default=None, metavar="[METHOD=]LR",
                   help="learning rates, each a finite number >= 0, e.g. SB=0.1 NGD=0.5 (default: the preset's)")
    p.add_argument("--penalty", nargs="+", type=_assignment, default=None, metavar="[METHOD=]LAMBDA",
                   help="λ of the methods whose name gives none, each a finite number >= 0, e.g. GN=0.01 (a "
                        "name's @λ= wins; default: the preset's)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="|B| (default: the preset's)")
    p.add_argument("--micro-batch-size", type=POSITIVE_INT, default=None,
                   help="|M|, also SB's batch size (default: the preset's)")
    p.add_argument("--momentum", type=NON_NEGATIVE_FLOAT, default=None,
                   help="SGD momentum of every method (default: the preset's, 0 in every preset)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=None,
                   help="weight decay of every method (default: the preset's, 0 in every preset)")
    p.add_argument("--eval-every", type=POSITIVE_INT, default=None,
                   help="steps between held-out evaluations (default: the preset's)")
    p.add_argument("--eval-size", type=NON_NEGATIVE_INT, default=None,
                   help="held-out examples per evaluation, 0: all (default: the preset's)")
    p.add_argument("--test-size", type=NON_NEGATIVE_INT, default=None,
                   help="test examples for the final test accuracy, 0: all (default: the preset's)")
    p.add_argument("--bn-recalibrate", type=NON_NEGATIVE_INT, default=None,
                   help="training micro-batches to recompute BatchNorm statistics from before each evaluation, "
                        "0: off (default: the preset's)")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, default=None,
                   help="steps between checkpoints, rounded up to a multiple of --eval-every (default: the "
                        "preset's, else about 1/20 of the steps)")
    p.add_argument("--dataset", default=None, choices=list(data_lib.DATASETS),
                   help="data set (default: the preset's)")
    p.add_argument("--data-root", default=None, help="torchvision data root (default ./data)")
    p.add_argument("--train-size", type=POSITIVE_INT, default=None,
                   help="train on the first N training images, the held-out set stays the last ones (default: "
                        "the preset's, else all)")
    p.add_argument("--heldout-size", type=POSITIVE_INT, default=None,
                   help="held-out images, the last ones (default 10,000)")
    p.add_argument("--compare-bn-eval", action="store_true",
                   help="also evaluate with the running BatchNorm statistics before recalibrating (bn_eval.csv)")
    p.add_argument("--model", default=None, choices=list(models_lib.MODELS),
                   help="model (default: the preset's)")
    p.add_argument("--widths", type=POSITIVE_INT, nargs="+", default=None,
                   help="small-cnn channel widths (default: the preset's)")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="torch CPU threads (per run with --jobs; default there: CPU cores / jobs)")
    p.add_argument("--nondeterministic", action="store_true",
                   help="let cuDNN choose nondeterministic (sometimes faster) algorithms: runs on CUDA are then not "
                        "reproducible bit for bit (across --jobs, --resume or reruns)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--interrupt-after", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)  # test hook
    return p


def check_runtime_options(args: argparse.Namespace) -> None:
    """--jobs > 1 is refused under torchrun (before any process group); the parser checked the values."""
    if args.jobs > 1 and launched_by_torchrun():
        raise SystemExit(f"--jobs {args.jobs} cannot be used under torchrun: there every rank already trains a shard "
                         "of every run together. Use --jobs 1 with torchrun, or --jobs N without torchrun.")


def _on_main_rank(action: Callable[[], Any], ctx: Dist) -> Any:
    """``action()`` on rank 0 alone (its result there, None on the other ranks). A refusal there (SystemExit)
    is raised on every rank, so that under torchrun no rank waits forever for a rank 0 that has left."""
    result, refusal = None, None
    if ctx.is_main:
        try:
            result = action()
        except SystemExit as err:
            refusal = err
    refusal = broadcast_object(refusal, ctx)
    if refusal is not None:
        raise refusal
    return result


def _resume_folder(args: argparse.Namespace) -> Path:
    """--resume: --out, else the newest run under results/<preset>/; it must hold a config.json."""
    out = args.out
    if out is None:
        candidates = sorted((Path("results") / args.preset).glob("*/config.json"))
        if not candidates:
            raise SystemExit(f"--resume: no run under results/{args.preset}/; pass --out")
        out = candidates[-1].parent
    if not (out / "config.json").is_file():
        raise SystemExit(f"--resume: {out}/config.json not found")
    return out


def _unusable_config(path: Path, why: str) -> SystemExit:
    return SystemExit(f"--resume: {path} is not a configuration this script wrote ({why}): start a new --out, "
                      "or put back the run's own config.json")


def _resumed(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], bool]:
    """The saved configuration of ``out`` grown by the options, and whether config.json must be rewritten."""
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _unusable_config(path, f"{type(err).__name__}: {err}") from None
    except (KeyError, TypeError):
        raise _unusable_config(path, "no 'config' entry") from None
    try:
        config = resumed_config(args, saved, out)
    except KeyError as err:
        raise _unusable_config(path, f"its configuration has no {err.args[0]!r} entry") from None
    except TypeError as err:
        raise _unusable_config(path, f"TypeError: {err}") from None
    return config, (config["methods"], config["seeds"]) != (saved["methods"], saved["seeds"])


@contextlib.contextmanager
def _claimed_output(args: argparse.Namespace, ctx: Dist) -> Iterator[tuple[Path, dict[str, Any], bool]]:
    """The output folder, locked by rank 0 while the run lasts; its configuration; whether config.json must be
    (re)written. --resume: the folder's saved configuration (grown by --methods/--seeds); otherwise the options'
    configuration, in a new or empty folder (see folder.py)."""
    if args.resume:
        out = _resume_folder(args)
    else:
        config = config_lib.build_config(args)  # before any folder exists: wrong options create nothing
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or Path("results") / config["preset"] / broadcast_object(stamp, ctx)
    lock = _on_main_rank(lambda: lock_folder(out), ctx)
    try:
        if args.resume:
            config, write_config = _resumed(args, out)  # read under the lock: no run rewrites it meanwhile
        else:
            _on_main_rank(lambda: check_new_run(out), ctx)
            write_config = True
        yield out, config, write_config
    finally:
        if lock is not None:
            lock.release()


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


def _run(args: argparse.Namespace, ctx: Dist, device: torch.device, out: Path, config: dict[str, Any],
         write_config: bool, started: float) -> None:
    """Load the data, record the configuration (rank 0), run every planned run, print the summary."""
    threads = _threads(args, config, device)
    if threads:
        torch.set_num_threads(threads)
    data = _load_data(config)
    config["data_source"] = config_lib.data_source(data)
    env = config_lib.environment(device, ctx.world_size, args.jobs, threads)
    config["device_name"] = env["device_name"]
    if ctx.is_main:
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


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the command line ``argv``; returns the output folder. A refusal exits (SystemExit, one line); a
    checkpoint that cannot be used raises :class:`~benchmarks.repro.training.CheckpointError`, typed for callers
    (:func:`script_main` prints it in one line)."""
    started = time.monotonic()
    args = make_parser().parse_args(argv)
    check_runtime_options(args)
    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx, device = setup_distributed(device_kind)
    with _claimed_output(args, ctx) as (out, config, write_config):
        config["device"] = device_kind
        _run(args, ctx, device, out, config, write_config, started)
    return out


def script_main(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/reproduce.py``: :func:`main`, with a checkpoint that cannot be used reported in one
    line naming the file and the fix, as every other refusal is."""
    try:
        main(argv)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
