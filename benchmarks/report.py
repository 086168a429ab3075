"""Writers of a reproduction run's outputs: metrics.csv, summary.md, curves.png (and runs.json), each
written to a temporary file and renamed into place, so a reader (or a cut run) never sees half a file.

``python benchmarks/report.py RUN_DIR`` rebuilds summary.md and curves.png from the run's
metrics.csv, runs.json and config.json (for example after copying a run from a GPU machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.repro.uncertainty import Interval, closed_fraction, mean_interval, paired_differences  # noqa: E402

METRIC_FIELDS = ("method", "seed", "step", "epoch", "train_loss", "heldout_acc", "micro_grad_sq_norm", "penalty",
                 "lr", "wall_s")
RESULT_FIELDS = ("method", "seed", "best_heldout_acc", "best_step", "final_heldout_acc", "test_acc", "steps",
                 "epochs", "wall_s", "diverged_at")


# -- metrics.csv ----------------------------------------------------------------------------------
def write_metrics_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Long format, one row per (method, seed, logged step), columns METRIC_FIELDS."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in METRIC_FIELDS})
    tmp.replace(path)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {"method": raw["method"]}
            for key in METRIC_FIELDS[1:]:
                value = raw.get(key, "")
                if key in ("seed", "step"):
                    row[key] = int(value)
                else:
                    row[key] = float(value) if value not in ("", None) else math.nan
            rows.append(row)
    return rows


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


# -- statistics -----------------------------------------------------------------------------------
def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample std (0 for one value) and count of the finite values; NaN mean when there are none."""
    vals = _finite(values)
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def fmt_mean_std(values: Iterable[float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "—"
    if n == 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


# Images in each dataset's held-out and test splits when the config does not cap them (benchmarks/data.py).
_SPLIT_IMAGES = {"fashion-mnist": 10_000, "fashion-mnist-subset": 2_000, "cifar10": 10_000, "cifar100": 10_000}


def evaluation_images(config: Mapping[str, Any], split: str) -> int | None:
    """How many images each ``split`` ("heldout" or "test") evaluation scored: the config's cap, or the whole
    split of a known dataset; None when neither is known (a synthetic dataset)."""
    cap = config.get("test_size") if split == "test" else (config.get("eval_size") or config.get("heldout_size"))
    whole = _SPLIT_IMAGES.get(str(config.get("dataset")))
    if cap:
        return min(int(cap), whole) if whole else int(cap)
    return whole


def method_order(methods: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    seen = list(dict.fromkeys(methods))
    return [m for m in preferred if m in seen] + [m for m in seen if m not in preferred]


def grad_norm_phases(rows: Sequence[Mapping[str, Any]], steps: int, fraction: float = 0.1) -> dict[tuple[str, int], tuple[float, float]]:
    """Per (method, seed): mean micro_grad_sq_norm over the logged rows in the first and the last
    ``fraction`` of the steps (at least the first / last logged row)."""
    by_run: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_run[(row["method"], int(row["seed"]))].append(row)
    out = {}
    for key, run in by_run.items():
        run = sorted(run, key=lambda r: r["step"])
        run = [r for r in run if r["micro_grad_sq_norm"] is not None and math.isfinite(float(r["micro_grad_sq_norm"]))]
        if not run:
            out[key] = (math.nan, math.nan)
            continue
        early = [r for r in run if r["step"] <= fraction * steps] or run[:1]
        late = [r for r in run if r["step"] > (1 - fraction) * steps] or run[-1:]
        out[key] = (statistics.fmean(float(r["micro_grad_sq_norm"]) for r in early),
                    statistics.fmean(float(r["micro_grad_sq_norm"]) for r in late))
    return out


# -- summary.md -----------------------------------------------------------------------------------
def summary_markdown(rows: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                     config: Mapping[str, Any]) -> str:
    """The summary table (one row per method, mean ± std over seeds) and the gap analysis."""
    methods = method_order([r["method"] for r in results], config.get("methods", ()))
    steps = int(config.get("steps", max([r["step"] for r in rows], default=1)))
    phases = grad_norm_phases(rows, steps)
    paper = config.get("paper_test_acc") or {}
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        by_method[r["method"]].append(r)
    seeds = sorted({int(r["seed"]) for r in results})

    lines = [f"# Reproduction summary: preset `{config.get('preset', '?')}`", ""]
    desc = (f"Data `{config.get('dataset')}`, model `{config.get('model')}`, |B| = {config.get('batch_size')}, "
            f"|M| = {config.get('micro_batch_size')}, {steps} optimizer steps per method, evaluation every "
            f"{config.get('eval_every')} steps, momentum {config.get('momentum')}, weight decay "
            f"{config.get('weight_decay')}, penalty gradients `{config.get('grad_method')}`, "
            f"seeds {seeds}, device `{config.get('device_name', config.get('device'))}`.")
    if config.get("data_source"):
        desc += f" Data source: {config['data_source']}."
    lines += [desc, ""]
    lines += _partial_note(results, config)
    lines.append("Accuracies in %, mean ± std over seeds. Test accuracy is that of the checkpoint with the best "
                 "held-out accuracy. ‖g‖² is the average micro-batch squared gradient norm Σ_j w_j ‖g_j‖² "
                 "(for SB: ‖g‖² of its own batch of |M|), averaged over the first (early) and last (late) 10% "
                 "of the steps.")
    lines.append("")
    header = ["method", "lr", f"λ (∇R {config.get('grad_method', '?')})", "best held-out", "final held-out", "test"]
    if paper:
        header.append("paper test")
    header += ["‖g‖² early", "‖g‖² late", "steps", "epochs", "wall s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for m in methods:
        rs = by_method[m]
        hp = config.get("resolved", {}).get(m, {})
        lr = rs[0].get("lr", hp.get("lr"))  # NGD's lr is only known once SB has run
        cells = [f"`{m}`", _num(lr), _num(hp.get("penalty")),
                 fmt_mean_std([r["best_heldout_acc"] for r in rs], 100),
                 fmt_mean_std([r["final_heldout_acc"] for r in rs], 100),
                 fmt_mean_std([r["test_acc"] for r in rs], 100)]
        if paper:
            cells.append(f"{paper[m]:.2f}" if m in paper else "—")
        early = [phases.get((m, int(r["seed"])), (math.nan, math.nan))[0] for r in rs]
        late = [phases.get((m, int(r["seed"])), (math.nan, math.nan))[1] for r in rs]
        cells += [fmt_mean_std(early, digits=3), fmt_mean_std(late, digits=3),
                  str(max(int(r["steps"]) for r in rs)),
                  _epochs(statistics.fmean(float(r["epochs"]) for r in rs)),
                  f"{statistics.fmean(float(r['wall_s']) for r in rs):.0f}"]
        diverged = [r for r in rs if r.get("diverged_at") is not None]
        if diverged:
            cells[0] += " (diverged: " + ", ".join(f"seed {r['seed']} at step {r['diverged_at']}" for r in diverged) + ")"
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + gap_section(by_method) + [""]
    return "\n".join(lines)


def _epochs(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _num(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    return f"{value:.4g}"


def _partial_note(results: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> list[str]:
    """A line saying so when fewer runs finished than planned (a --time-budget stop, an interruption)."""
    if not config.get("methods") or not config.get("seeds"):
        return []
    planned = len(config["methods"]) * int(config["seeds"])
    if len(results) >= planned:
        return []
    return [f"**Partial results:** {len(results)} of the {planned} planned runs (methods × seeds) have finished; "
            "`python benchmarks/reproduce.py --resume --out RUN_DIR` runs the rest.", ""]


def _by_seed(runs: Sequence[Mapping[str, Any]], key: str = "test_acc") -> dict[int, float | None]:
    return {int(r["seed"]): r.get(key) for r in runs}


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def _interval_text(interval: Interval | None) -> str:
    if interval is None:
        return "—"
    return f"[{_points(interval.low)}, {_points(interval.high)}]"


def gap_section(by_method: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """How much of the SB−LB test-accuracy gap each method closes (claims 1 and 2 of docs/method.md), with 95% intervals
    over seeds (paired by seed) once there are two seeds or more."""
    if "SB" not in by_method or "LB" not in by_method:
        return []
    key = "test_acc"
    sb, sb_std, n = mean_std(r[key] for r in by_method["SB"])
    lb, lb_std, _ = mean_std(r[key] for r in by_method["LB"])
    if not (math.isfinite(sb) and math.isfinite(lb)):
        return ["## Large-batch gap", "", "SB or LB has no finite test accuracy: no gap to analyse."]
    gap = sb - lb
    lines = ["## Large-batch gap", ""]
    lines.append(f"SB − LB test accuracy: {_points(gap)} points (SB {100 * sb:.2f}, LB {100 * lb:.2f}; "
                 f"seed std SB {100 * sb_std:.2f}, LB {100 * lb_std:.2f}; {n} seed(s)).")
    paired = mean_interval(paired_differences(_by_seed(by_method["SB"]), _by_seed(by_method["LB"])))
    if paired is not None:
        lines.append(_gap_interval_sentence(paired))
    if gap <= 0:
        lines.append("**No large-batch gap in this run** (LB is not worse than SB), so the closing fractions "
                     "below are not meaningful.")
    elif paired is None and (n < 2 or gap <= 2 * max(sb_std, lb_std)):
        lines.append("The gap is not clearly above the seed-to-seed spread (or there is a single seed): "
                     "treat the fractions below as indicative only.")
    others = {m: rs for m, rs in by_method.items() if m not in ("SB", "LB")}
    if not others:
        return lines
    return lines + [""] + _method_table(others, by_method["SB"], by_method["LB"], sb, lb, paired is not None)


def _gap_interval_sentence(paired: Interval) -> str:
    level = f"{100 * paired.confidence:.0f}%"
    text = (f"Paired by seed (same initialization and batches), SB − LB is {_points(paired.mean)} points, {level} "
            f"interval {_interval_text(paired)} (mean ± t·s/√n over n = {paired.n} seeds, Student t with n − 1 "
            "degrees of freedom). ")
    if paired.includes_zero:
        return text + (f"**The interval includes zero: these {paired.n} seeds do not establish a large-batch gap**, "
                       "so neither do the closing fractions below.")
    return text + "The interval excludes zero: these seeds establish the gap."


def _method_table(others: Mapping[str, Sequence[Mapping[str, Any]]], sb_runs: Sequence[Mapping[str, Any]],
                  lb_runs: Sequence[Mapping[str, Any]], sb: float, lb: float, with_intervals: bool) -> list[str]:
    """One row per method: its distance to LB (and to SB), the fraction of the gap it closes; intervals if asked."""
    if with_intervals:
        lines = ["| method | test − LB (points) | 95% interval | SB − test (points) | 95% interval | seeds | "
                 "fraction of the gap closed |", "|---|---|---|---|---|---|---|"]
    else:
        lines = ["| method | test − LB (points) | fraction of the gap closed |", "|---|---|---|"]
    notes = []
    for m, rs in others.items():
        acc, _, k = mean_std(r["test_acc"] for r in rs)
        if k == 0:
            lines.append(f"| `{m}` | — |" + " — |" * (5 if with_intervals else 1))
            continue
        frac = closed_fraction(acc, lb, sb)
        frac_text = f"{frac:.2f}" if math.isfinite(frac) else "—"
        if not with_intervals:
            lines.append(f"| `{m}` | {_points(acc - lb)} | {frac_text} |")
            continue
        over_lb = mean_interval(paired_differences(_by_seed(rs), _by_seed(lb_runs)))
        below_sb = mean_interval(paired_differences(_by_seed(sb_runs), _by_seed(rs)))
        seeds = over_lb.n if over_lb is not None else k
        lines.append(f"| `{m}` | {_points(acc - lb)} | {_interval_text(over_lb)} | {_points(sb - acc)} | "
                     f"{_interval_text(below_sb)} | {seeds} | {frac_text} |")
        notes += _zero_notes(m, over_lb, below_sb)
    if with_intervals:
        lines += ["", "Intervals: 95%, of the per-seed paired differences (test − LB, SB − test), "
                      "mean ± t·s/√n over the n seeds both runs have."]
        lines += notes or ["No method's interval includes zero."]
    return lines


def _zero_notes(method: str, over_lb: Interval | None, below_sb: Interval | None) -> list[str]:
    """Plain sentences for the intervals that include zero (and for methods with too few seeds for one)."""
    if over_lb is None or below_sb is None:
        return [f"- `{method}`: fewer than two seeds paired with SB and LB, no interval."]
    said = []
    if over_lb.includes_zero:
        said.append("its difference to LB includes zero (these seeds do not show it better than LB)")
    if below_sb.includes_zero:
        said.append("its difference to SB includes zero (these seeds do not show it worse than SB)")
    return [f"- `{method}`: " + "; ".join(said) + "."] if said else []


def write_summary(path: str | Path, rows: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                  config: Mapping[str, Any]) -> None:
    _write_text_atomic(Path(path), summary_markdown(rows, results, config))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- curves.png -----------------------------------------------------------------------------------
def plot_curves(path: str | Path, rows: Sequence[Mapping[str, Any]], methods: Sequence[str] = (),
                title: str = "") -> None:
    """Figure-1 analogue: held-out accuracy and average micro-batch squared gradient norm against step,
    one line per method (mean over seeds, shaded min–max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = method_order([r["method"] for r in rows], methods)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10")
    panels = (("heldout_acc", "held-out accuracy", 100.0), ("micro_grad_sq_norm", "avg micro-batch ‖g‖² (log)", 1.0))
    for i, method in enumerate(order):
        per_step: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["method"] == method:
                per_step[int(r["step"])].append(r)
        steps = sorted(per_step)
        color = cmap(i % 10)
        style = "-" if i < 10 else "--"
        for ax, (key, _, scale) in zip(axes, panels):
            xs, mean, lo, hi = [], [], [], []
            for s in steps:
                vals = _finite(r[key] for r in per_step[s])
                if key == "micro_grad_sq_norm":
                    vals = [v for v in vals if v > 0]
                if not vals:
                    continue
                xs.append(s)
                mean.append(statistics.fmean(vals) * scale)
                lo.append(min(vals) * scale)
                hi.append(max(vals) * scale)
            if not xs:
                continue
            ax.plot(xs, mean, style, color=color, label=method, linewidth=1.4)
            if any(h > l for h, l in zip(hi, lo)):
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    for ax, (key, label, _) in zip(axes, panels):
        ax.set_xlabel("step")
        ax.set_ylabel(label + (" (%)" if key == "heldout_acc" else ""))
        ax.grid(alpha=0.3)
    if any(line.get_ydata().size for line in axes[1].get_lines()):
        axes[1].set_yscale("log")
    axes[0].legend(fontsize=8, ncol=2, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)


# -- everything -------------------------------------------------------------------------------------
def write_all(out: str | Path, rows: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
              config: Mapping[str, Any], plot: bool = True) -> None:
    """metrics.csv, runs.json, summary.md and (if ``plot``) curves.png under ``out``."""
    out = Path(out)
    write_metrics_csv(out / "metrics.csv", rows)
    write_json(out / "runs.json", list(results))
    write_summary(out / "summary.md", rows, results, config)
    bn_rows = [r for r in rows if "heldout_acc_running_bn" in r]
    if bn_rows:  # the --compare-bn-eval diagnostic
        tmp = out / "bn_eval.csv.tmp"
        with open(tmp, "w", newline="") as f:
            fields = ("method", "seed", "step", "heldout_acc_running_bn", "heldout_acc")
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: _fmt(r.get(k)) for k in fields} for r in bn_rows)
        tmp.replace(out / "bn_eval.csv")
    if rows and plot:
        plot_curves(out / "curves.png", rows, config.get("methods", ()),
                    title=f"{config.get('preset', '')}: {config.get('dataset', '')} / {config.get('model', '')}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild summary.md and curves.png of a reproduction run.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    saved = json.loads((args.run_dir / "config.json").read_text())
    config = saved.get("config", saved)  # reproduce.py writes {"config": ..., "environment": ...}
    rows = read_metrics_csv(args.run_dir / "metrics.csv")
    results = json.loads((args.run_dir / "runs.json").read_text())
    write_summary(args.run_dir / "summary.md", rows, results, config)
    plot_curves(args.run_dir / "curves.png", rows, config.get("methods", ()),
                title=f"{config.get('preset', '')}: {config.get('dataset', '')} / {config.get('model', '')}")
    print((args.run_dir / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
