"""The scouting table: which setting shows the largest held-out SB − LB gap per unit of compute.

``python benchmarks/scout_report.py FOLDER [FOLDER ...]`` reads reproduce.py output folders that hold SB and
LB runs (as benchmarks/scout_gap.sh writes them, one folder per setting) and prints, per setting:

- the SB − LB gap, paired by seed, in three measures: best held-out accuracy, the mean held-out accuracy of the
  last 10 evaluations, and test accuracy at the best-held-out checkpoint; each with its 95% interval
  (:func:`benchmarks.repro.uncertainty.seed_and_evaluation_interval`: paired t over seeds, widened by the
  binomial sampling error of the 10,000 evaluation images);
- the compute of one SB + LB pair in floating-point operations (training: 3 × forward FLOPs per image × images;
  evaluation: forward FLOPs × images evaluated), counted by torch's FlopCounterMode on the setting's model,
  and the measured wall seconds per run (beside it, since runs that share a GPU slow each other);
- the gap (best held-out) per PFLOP. The chosen setting is the one with the largest gap per PFLOP among
  those with at least ``--min-seeds`` seeds: FLOPs do not depend on how many runs shared the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report  # noqa: E402
from benchmarks.repro.uncertainty import (Interval, evaluation_se, mean_interval,  # noqa: E402
                                          seed_and_evaluation_interval)


@dataclass(frozen=True)
class SeedScores:
    """One run's three accuracies (fractions): best held-out, mean of the last held-out evaluations, test."""

    best_heldout: float
    last_heldout: float
    test: float


@dataclass(frozen=True)
class Setting:
    """One scouted setting: its per-seed scores for SB and LB, its compute and what its folder records."""

    name: str
    config: Mapping[str, Any]
    environment: Mapping[str, Any]
    scores: Mapping[str, Mapping[int, SeedScores]]
    wall_s: Mapping[str, float]
    pflop_per_pair: float

    @property
    def seeds(self) -> list[int]:
        return sorted(set(self.scores.get("SB", {})) & set(self.scores.get("LB", {})))

    def differences(self, measure: str) -> list[float]:
        """SB − LB in ``measure`` (a SeedScores field), seed by seed."""
        sb, lb = self.scores["SB"], self.scores["LB"]
        return [getattr(sb[s], measure) - getattr(lb[s], measure) for s in self.seeds]

    def gap(self, measure: str) -> Interval | None:
        """SB − LB in ``measure``, paired by seed, its interval widened by the evaluation images' sampling error."""
        means = [statistics.fmean(getattr(runs[s], measure) for s in self.seeds)
                 for runs in (self.scores["SB"], self.scores["LB"])]
        images = report.evaluation_images(self.config, "test" if measure == "test" else "heldout")
        return seed_and_evaluation_interval(self.differences(measure), evaluation_se(means[0], means[1], images))

    def positive_seeds(self, measure: str = "best_heldout") -> int:
        sb, lb = self.scores["SB"], self.scores["LB"]
        return sum(getattr(sb[s], measure) > getattr(lb[s], measure) for s in self.seeds)


def seed_scores(runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, SeedScores]]:
    out: dict[str, dict[int, SeedScores]] = {}
    for r in runs:
        seed = int(r["seed"])
        out.setdefault(r["method"], {})[seed] = SeedScores(
            float(r["best_heldout_acc"]), report.last_heldout_mean(rows, r["method"], seed), float(r["test_acc"]))
    return out


def forward_flops_per_image(config: Mapping[str, Any]) -> float:
    """Forward FLOPs of the setting's model on one 28×28 (or 32×32 colour) image, counted by FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.models import build_model

    colour = str(config.get("dataset", "")).startswith("cifar")
    model = build_model(config["model"], in_channels=3 if colour else 1, **config.get("model_kwargs", {})).eval()
    image = torch.zeros(1, 3, 32, 32) if colour else torch.zeros(1, 1, 28, 28)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return float(counter.get_total_flops())


def run_flops(config: Mapping[str, Any], method: str, forward: float) -> float:
    """FLOPs of one run: 3 × forward per training image, plus the forward passes of every evaluation
    (BatchNorm recalibration and the held-out set) and of the final test evaluation."""
    resolved = config.get("resolved", {}).get(method, {})
    batch = int(resolved.get("batch_size", config["batch_size"]))
    steps, every = int(config["steps"]), int(config["eval_every"])
    per_evaluation = int(config.get("bn_recalibrate", 0)) * int(config["micro_batch_size"]) + \
        report.evaluation_images(config, "heldout")
    evaluated = (steps // every) * per_evaluation + report.evaluation_images(config, "test")
    return forward * (3 * steps * batch + evaluated)


def load_setting(folder: Path) -> Setting:
    saved = json.loads((folder / "config.json").read_text())
    config = saved.get("config", saved)
    runs = json.loads((folder / "runs.json").read_text())
    rows = report.read_metrics_csv(folder / "metrics.csv")
    forward = forward_flops_per_image(config)
    wall = {m: statistics.fmean(float(r["wall_s"]) for r in runs if r["method"] == m) for m in ("SB", "LB")}
    pair = sum(run_flops(config, m, forward) for m in ("SB", "LB")) / 1e15
    return Setting(folder.name, config, saved.get("environment", {}), seed_scores(runs, rows), wall, pair)


def choose(settings: Sequence[Setting], min_seeds: int) -> Setting | None:
    """The setting with the largest best-held-out gap per PFLOP among those with at least ``min_seeds`` seeds."""
    eligible = [s for s in settings if len(s.seeds) >= min_seeds and s.gap("best_heldout") is not None]
    return max(eligible, key=lambda s: s.gap("best_heldout").mean / s.pflop_per_pair, default=None)


def _bounds(interval: Interval) -> str:
    return f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"


def _cell(setting: Setting, measure: str) -> str:
    """'mean [over seeds] / [with evaluation noise]' in points."""
    with_eval, seeds_only = setting.gap(measure), mean_interval(setting.differences(measure))
    if with_eval is None or seeds_only is None:
        return "—"
    return f"{100 * with_eval.mean:+.2f} {_bounds(seeds_only)} / {_bounds(with_eval)}"


def scouting_table(settings: Sequence[Setting], min_seeds: int = 4) -> str:
    """The markdown table (one row per setting) and the sentence naming the chosen setting and the rule."""
    lines = ["| setting | seeds | SB − LB best held-out | last-10 held-out mean | test | seeds SB > LB (best "
             "held-out) | PFLOP per SB + LB pair | wall s per run SB / LB | best held-out gap per PFLOP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in settings:
        best = s.gap("best_heldout")
        per = f"{100 * best.mean / s.pflop_per_pair:+.3f}" if best is not None else "—"
        lines.append(f"| `{s.name}` | {len(s.seeds)} | {_cell(s, 'best_heldout')} | {_cell(s, 'last_heldout')} | "
                     f"{_cell(s, 'test')} | {s.positive_seeds()} of {len(s.seeds)} | {s.pflop_per_pair:.3f} | "
                     f"{s.wall_s['SB']:.0f} / {s.wall_s['LB']:.0f} | {per} |")
    lines += ["", "Gaps in points of accuracy: mean over seeds, paired by seed, then two 95% intervals: the paired "
              "t over seeds alone, and the same widened by the binomial sampling error of the 10,000 evaluation "
              "images (an upper bound for a paired difference: conservative). Test accuracy is "
              "that of the best-held-out checkpoint. Wall seconds were measured with several runs sharing one "
              "device: a rough guide, not a speed measurement."]
    chosen = choose(settings, min_seeds)
    if chosen is None:
        lines += ["", f"No setting has {min_seeds} or more seeds with a gap: none chosen."]
    else:
        lines += ["", f"Chosen by the rule (largest best-held-out SB − LB gap per PFLOP, at least {min_seeds} "
                      f"seeds): `{chosen.name}`."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rank scouted settings by held-out SB − LB gap per unit of compute.")
    parser.add_argument("folders", type=Path, nargs="+", help="reproduce.py output folders with SB and LB runs")
    parser.add_argument("--min-seeds", type=int, default=4, help="fewest seeds a setting needs to be chosen")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.min_seeds < 2:
        parser.error(f"--min-seeds must be at least 2 (an interval needs two seeds), got {args.min_seeds}")
    table = scouting_table([load_setting(f) for f in args.folders], args.min_seeds)
    if args.out:
        report._write_text_atomic(args.out, table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
