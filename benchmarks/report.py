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
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.repro.uncertainty import Comparison, Interval, closed_fraction, compare  # noqa: E402

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
    """What the run shows (generated from its intervals), the per-method table, the gap and the mechanism."""
    methods = method_order([r["method"] for r in results], config.get("methods", ()))
    steps = int(config.get("steps", max([r["step"] for r in rows], default=1)))
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        by_method[r["method"]].append(r)
    by_method = {m: by_method[m] for m in methods}
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
    mechanism = mechanism_rows(rows, by_method, steps)
    gap = _comparison(by_method.get("SB"), by_method.get("LB"), "test_acc", evaluation_images(config, "test"))
    lines += ["## What this run shows", ""] + _lead(mechanism, gap, config) + [""]
    lines += _results_table(rows, by_method, config, steps) + [""]
    lines += gap_section(by_method, config, rows) + [""]
    lines += mechanism_section(mechanism, config) + [""]
    return "\n".join(lines)


def _results_table(rows: Sequence[Mapping[str, Any]], by_method: Mapping[str, Sequence[Mapping[str, Any]]],
                   config: Mapping[str, Any], steps: int) -> list[str]:
    """One row per method, mean ± std over seeds."""
    phases = grad_norm_phases(rows, steps)
    paper = config.get("paper_test_acc") or {}
    lines = ["Accuracies in %, mean ± std over seeds. Test accuracy is that of the checkpoint with the best "
             "held-out accuracy (selection on held-out data only). ‖g‖² is the average micro-batch squared gradient "
             "norm Σ_j w_j ‖g_j‖² (for SB: ‖g‖² of its own batch of |M|), averaged over the first (early) and last "
             "(late) 10% of the steps.", ""]
    header = ["method", "lr", f"λ (∇R {config.get('grad_method', '?')})", "best held-out", "final held-out", "test"]
    if paper:
        header.append("paper test")
    header += ["‖g‖² early", "‖g‖² late", "steps", "epochs", "wall s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for m, rs in by_method.items():
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
    return lines


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


def _comparison(a_runs: Sequence[Mapping[str, Any]] | None, b_runs: Sequence[Mapping[str, Any]] | None, key: str,
                images: int | None) -> Comparison | None:
    """a − b in ``key``, paired by seed (None with fewer than two common seeds or a missing method)."""
    if not a_runs or not b_runs:
        return None
    return compare(_by_seed(a_runs, key), _by_seed(b_runs, key), images)


def _comparison_cell(comp: Comparison | None, a_runs: Sequence[Mapping[str, Any]],
                     b_runs: Sequence[Mapping[str, Any]], key: str) -> str:
    """'mean [over seeds] / [with evaluation noise]' in points, or the plain difference of means for one seed."""
    if comp is None:
        a, _, _ = mean_std(r.get(key) for r in a_runs)
        b, _, _ = mean_std(r.get(key) for r in b_runs)
        return _points(a - b) if math.isfinite(a - b) else "—"
    wide = f" / {_interval_text(comp.with_evaluation)}" if comp.with_evaluation is not None else ""
    return f"{_points(comp.seeds.mean)} {_interval_text(comp.seeds)}{wide}"


LAST_EVALUATIONS = 10
FULL_RESULTS = "benchmarks/RESULTS_fmnist.md"
MEASURES = (("test_acc", "test accuracy at the best-held-out checkpoint", "test"),
            ("last_heldout_acc", f"held-out accuracy, mean of the last {LAST_EVALUATIONS} evaluations", "heldout"))
INTERVALS_NOTE = ("Intervals (95%), in points, of the per-seed paired differences: first over seeds alone "
                  "(mean ± t·s/√n, Student t with n − 1 degrees of freedom), then widened by the evaluation "
                  "images' binomial sampling error, which does not average out over seeds scored on the same "
                  "images (an upper bound for a paired difference; Welch–Satterthwaite degrees of freedom). Words "
                  "are generated from them: a method \"closes the gap\" only when SB − LB and the method − LB "
                  "interval over seeds both lie above zero; \"not distinguishable\" when an interval includes zero.")


def last_heldout_mean(rows: Sequence[Mapping[str, Any]], method: str, seed: int,
                      last: int = LAST_EVALUATIONS) -> float:
    """Mean held-out accuracy of the run's last ``last`` logged evaluations (finite values only)."""
    run = sorted((r for r in rows if r["method"] == method and int(r["seed"]) == seed), key=lambda r: r["step"])
    values = _finite(r["heldout_acc"] for r in run)[-last:]
    return statistics.fmean(values) if values else math.nan


def _with_last_heldout(by_method: Mapping[str, Sequence[Mapping[str, Any]]],
                       rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {m: [dict(r, last_heldout_acc=last_heldout_mean(rows, m, int(r["seed"]))) for r in rs]
            for m, rs in by_method.items()}


def gap_section(by_method: Mapping[str, Sequence[Mapping[str, Any]]], config: Mapping[str, Any] | None = None,
                rows: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """SB − LB (claim 1 of docs/method.md) and every other method against both (claim 2), in test accuracy at the
    best-held-out checkpoint and (with logged rows) in the mean of the last held-out evaluations."""
    config = config or {}
    if "SB" not in by_method or "LB" not in by_method:
        return []
    sb, sb_std, n = mean_std(r["test_acc"] for r in by_method["SB"])
    lb, lb_std, _ = mean_std(r["test_acc"] for r in by_method["LB"])
    if not (math.isfinite(sb) and math.isfinite(lb)):
        return ["## Large-batch gap", "", "SB or LB has no finite test accuracy: no gap to analyse."]
    runs = _with_last_heldout(by_method, rows)
    measures = MEASURES if rows else MEASURES[:1]
    lines = ["## Large-batch gap", "",
             f"SB − LB test accuracy: {_points(sb - lb)} points (SB {100 * sb:.2f}, LB {100 * lb:.2f}; seed std SB "
             f"{100 * sb_std:.2f}, LB {100 * lb_std:.2f}; {n} seed(s)).", ""]
    levels = []
    for key, label, split in measures:
        comp = _comparison(runs["SB"], runs["LB"], key, evaluation_images(config, split))
        levels.append(comp.level if comp is not None else 0)
        lines.append("- " + gap_sentence(comp, label))
    lines += _held_out_choices(by_method)
    others = [m for m in runs if m not in ("SB", "LB")]
    for (key, label, split), level in zip(measures, levels):
        if others:
            lines += ["", f"### Each method against LB and SB: {label}", ""]
            lines += _method_table(others, runs, key, evaluation_images(config, split), level)
    return lines + ["", INTERVALS_NOTE]


def gap_sentence(comp: Comparison | None, label: str) -> str:
    """SB − LB in one measure and what its intervals allow to be said, in words fixed by the interval's level."""
    if comp is None:
        return f"SB − LB, {label}: one seed, no interval: **a single seed cannot establish a large-batch gap**."
    n = comp.seeds.n
    wide = (f", widened by evaluation noise {_interval_text(comp.with_evaluation)}"
            if comp.with_evaluation is not None else "")
    text = f"SB − LB, {label}: {_points(comp.seeds.mean)} points, over {n} seeds {_interval_text(comp.seeds)}{wide}. "
    words = {
        2: "**SB is better than LB: the gap is established** (both intervals lie above zero).",
        1: ("**SB is better than LB over these seeds**, but not beyond the evaluation images' sampling error "
            "(the widened interval includes zero, or the number of images is unknown)."),
        0: f"**Not distinguishable: these {n} seeds do not establish a large-batch gap.**",
        -1: "**LB is better than SB here: there is no large-batch gap to close.**",
        -2: "**LB is better than SB here: there is no large-batch gap to close.**",
    }
    return text + words[comp.level]


def _family(method: str) -> str:
    return re.split(r"[@-]", method, maxsplit=1)[0]


def _held_out_choices(by_method: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """For a method run at several settings (λ, subsampling, |M|): the one held-out accuracy picks."""
    families: dict[str, list[str]] = defaultdict(list)
    for m in by_method:
        if m not in ("SB", "LB"):
            families[_family(m)].append(m)
    lines = []
    for family, names in families.items():
        if len(names) < 2:
            continue
        score = {m: mean_std(r["best_heldout_acc"] for r in by_method[m])[0] for m in names}
        best = max(names, key=lambda m: score[m] if math.isfinite(score[m]) else -math.inf)
        lines.append(f"- Selection rule: among the {family} variants ({', '.join(f'`{m}`' for m in names)}) the best "
                     f"mean best-held-out accuracy picks `{best}` ({100 * score[best]:.2f}%); quote its test accuracy, "
                     "not the highest test accuracy (that would select on the test set).")
    return lines


def _method_table(others: Sequence[str], runs: Mapping[str, Sequence[Mapping[str, Any]]], key: str,
                  images: int | None, gap_level: int) -> list[str]:
    """One row per method: method − LB and SB − method with their intervals, the fraction closed, the verdict."""
    lines = ["| method | method − LB | SB − method | seeds | fraction of the gap closed | verdict |",
             "|---|---|---|---|---|---|"]
    sb = mean_std(r.get(key) for r in runs["SB"])[0]
    lb = mean_std(r.get(key) for r in runs["LB"])[0]
    for m in others:
        acc, _, k = mean_std(r.get(key) for r in runs[m])
        if k == 0:
            lines.append(f"| `{m}` | — | — | 0 | — | no finite value |")
            continue
        over_lb = _comparison(runs[m], runs["LB"], key, images)
        below_sb = _comparison(runs["SB"], runs[m], key, images)
        frac = closed_fraction(acc, lb, sb) if gap_level >= 1 else math.nan
        seeds = over_lb.seeds.n if over_lb is not None else k
        lines.append(f"| `{m}` | {_comparison_cell(over_lb, runs[m], runs['LB'], key)} | "
                     f"{_comparison_cell(below_sb, runs['SB'], runs[m], key)} | {seeds} | "
                     f"{f'{frac:.2f}' if math.isfinite(frac) else '—'} | {method_verdict(over_lb, below_sb, gap_level)} |")
    return lines


def method_verdict(over_lb: Comparison | None, below_sb: Comparison | None, gap_level: int) -> str:
    """Words for one method from the levels of (method − LB) and (SB − method) and of the SB − LB gap."""
    if over_lb is None or below_sb is None:
        return "one seed: no verdict"
    if over_lb.level < 0:
        return "below LB"
    if over_lb.level == 0:
        return "not distinguishable from LB" + (", below SB" if below_sb.level > 0 else "")
    if gap_level < 1:
        return "above LB, but no established gap to close"
    noise = "" if over_lb.level == 2 else " (over these seeds, within evaluation noise)"
    if below_sb.level > 0:
        return "closes part of the gap" + noise
    return ("above SB" if below_sb.level < 0 else "closes the gap") + noise


def mechanism_rows(rows: Sequence[Mapping[str, Any]], by_method: Mapping[str, Sequence[Mapping[str, Any]]],
                   steps: int, fraction: float = 0.25) -> dict[str, dict[int, float]]:
    """Per method and seed: the mean logged micro_grad_sq_norm from the second evaluation to ``fraction`` of the
    steps (the first is the initial transient; later LB fits its training data and every norm collapses); the
    second logged row alone when that window is empty."""
    out: dict[str, dict[int, float]] = {}
    for m, rs in by_method.items():
        for seed in sorted(int(r["seed"]) for r in rs):
            run = sorted((r for r in rows if r["method"] == m and int(r["seed"]) == seed), key=lambda r: r["step"])
            run = [r for r in run if _finite([r["micro_grad_sq_norm"]])]
            window = [r for r in run[1:] if r["step"] <= fraction * steps] or run[1:2] or run[:1]
            if window:
                out.setdefault(m, {})[seed] = statistics.fmean(float(r["micro_grad_sq_norm"]) for r in window)
    return out


def _lower_on(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[int, int]:
    """(seeds where a < b, seeds both have)."""
    common = sorted(set(a) & set(b))
    return sum(a[s] < b[s] for s in common), len(common)


def mechanism_section(mechanism: Mapping[str, Mapping[int, float]], config: Mapping[str, Any]) -> list[str]:
    """The table of the early average micro-batch ‖g‖² per method, against LB."""
    if not mechanism:
        return []
    lb = mechanism.get("LB", {})
    lb_mean = statistics.fmean(lb.values()) if lb else math.nan
    lines = ["## The mechanism: average micro-batch ‖g‖² from the second evaluation to a quarter of the steps", "",
             "| method | λ | mean ‖g‖² | × LB | seeds below LB |", "|---|---|---|---|---|"]
    for m, per_seed in mechanism.items():
        value = statistics.fmean(per_seed.values())
        below, n = _lower_on(per_seed, lb) if m != "LB" and lb else (0, 0)
        ratio = f"{value / lb_mean:.2f}" if math.isfinite(lb_mean) else "—"
        lines.append(f"| `{m}` | {_num(config.get('resolved', {}).get(m, {}).get('penalty'))} | {value:.3g} | "
                     f"{ratio} | {f'{below} of {n}' if n else '—'} |")
    return lines


def _lead(mechanism: Mapping[str, Mapping[int, float]], gap: Comparison | None, config: Mapping[str, Any]) -> list[str]:
    """Three generated lines: LB's ‖g‖² against SB's, how each penalty moves it, and what accuracy can say."""
    lines = []
    sb, lb = mechanism.get("SB"), mechanism.get("LB")
    if sb and lb:
        above, n = _lower_on(sb, lb)
        lb_mean, sb_mean = statistics.fmean(lb.values()), statistics.fmean(sb.values())
        if above < n:
            shows = "not on every seed"
        else:
            shows = "on every seed: the premise of the paper's penalties" if n > 1 else "one seed: no evidence yet"
        lines.append(f"- From the second evaluation to a quarter of the steps LB's average micro-batch ‖g‖² is "
                     f"{lb_mean:.3g}, {lb_mean / sb_mean:.2f}× SB's {sb_mean:.3g}: higher on {above} of {n} seeds "
                     f"({shows}).")
    moved = []
    for m, per_seed in mechanism.items():
        penalty = config.get("resolved", {}).get(m, {}).get("penalty")
        if penalty and lb:
            value, lb_mean = statistics.fmean(per_seed.values()), statistics.fmean(lb.values())
            below, n = _lower_on(per_seed, lb)
            moved.append(f"`{m}`{'' if 'λ' in m else f' (λ = {penalty:g})'} {value:.3g}, {100 * (value / lb_mean - 1):+.0f}% against LB, "
                         f"lower on {below} of {n} seeds")
    if moved:
        lines.append("- The penalties move it: " + "; ".join(moved) + ".")
    if not (sb and lb):
        lines.append(f"- Accuracy: this run has no SB and LB pair, so it measures no large-batch gap; the committed "
                     f"runs and their verdict are in {FULL_RESULTS}.")
    elif gap is not None and gap.level >= 1:
        lines.append("- Accuracy: SB beats LB in test accuracy " + ("beyond seed and evaluation noise (below)."
                     if gap.level == 2 else "over these seeds, within the test images' sampling error (below)."))
    else:
        seeds = len(sb)
        lines.append(f"- Accuracy: this run does not establish a large-batch gap ({seeds} seed{'s' * (seeds != 1)}, "
                     f"{config.get('steps')} steps). Measuring it takes longer training and several seeds "
                     f"(`--preset fmnist-5k` or `fmnist`); the committed runs and their verdict are in {FULL_RESULTS}.")
    return lines


def write_summary(path: str | Path, rows: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                  config: Mapping[str, Any]) -> None:
    _write_text_atomic(Path(path), summary_markdown(rows, results, config))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- curves.png -----------------------------------------------------------------------------------
# One colour family per method family, so variants (λ, subsampling, |M|) of one penalty read as a group.
_FAMILY_COLOURS = {"SB": "Greys", "LB": "Reds", "GN": "Blues", "FT": "Greens", "AJ": "Purples", "UJ": "Oranges",
                   "GRAFT": "YlOrBr", "NGD": "PuRd"}


def method_label(method: str, config: Mapping[str, Any]) -> str:
    """The legend's name: the method with its λ when the name does not already carry it."""
    penalty = config.get("resolved", {}).get(method, {}).get("penalty")
    if penalty is None or "λ" in method or "lambda" in method:
        return method
    return f"{method} (λ={penalty:g})"


def method_colours(order: Sequence[str]) -> dict[str, Any]:
    """A colour per method: SB black, LB red, each penalty family its own hue, its variants darker in turn."""
    import matplotlib

    families: dict[str, list[str]] = defaultdict(list)
    for m in order:
        families[_family(m)].append(m)
    colours = {}
    for family, names in families.items():
        cmap = matplotlib.colormaps[_FAMILY_COLOURS.get(family, "Greys")]
        if family == "SB":
            shades = [0.95] * len(names)
        else:
            shades = [0.85] if len(names) == 1 else [0.45 + 0.5 * i / (len(names) - 1) for i in range(len(names))]
        colours.update({m: cmap(shade) for m, shade in zip(names, shades)})
    return colours


def _mean_band(rows: Sequence[Mapping[str, Any]], method: str, key: str, scale: float, log: bool = False):
    """Steps, the mean over seeds of ``key`` for ``method`` and its band ± one standard deviation (none for one
    seed); with ``log`` both are taken of log10 (a geometric mean and band, for a log axis)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] == method:
            values = [v * scale for v in _finite([r[key]]) if not log or v > 0]
            per_step[int(r["step"])] += [math.log10(v) for v in values] if log else values
    xs = [s for s in sorted(per_step) if per_step[s]]
    means = [statistics.fmean(per_step[s]) for s in xs]
    stds = [statistics.stdev(per_step[s]) if len(per_step[s]) > 1 else 0.0 for s in xs]
    low, high = [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)]
    if log:
        means, low, high = ([10 ** v for v in seq] for seq in (means, low, high))
    return xs, means, (low, high) if any(stds) else None


def plot_curves(path: str | Path, rows: Sequence[Mapping[str, Any]], methods: Sequence[str] = (),
                title: str = "", config: Mapping[str, Any] | None = None) -> None:
    """Figure-1 analogue: held-out accuracy and average micro-batch squared gradient norm against step, one line
    per method (mean over seeds, band ± one std), methods grouped by colour family, λ in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = config or {}
    order = method_order([r["method"] for r in rows], methods)
    colours = method_colours(order)
    seeds = len({int(r["seed"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (("heldout_acc", "held-out accuracy (%)", 100.0),
              ("micro_grad_sq_norm", "avg micro-batch ‖g‖² (log; geometric mean and band)", 1.0))
    accuracy_means: list[float] = []
    for method in order:
        for ax, (key, _, scale) in zip(axes, panels):
            xs, means, band = _mean_band(rows, method, key, scale, log=key == "micro_grad_sq_norm")
            if not xs:
                continue
            width = 2.2 if method in ("SB", "LB") else 1.5
            ax.plot(xs, means, color=colours[method], label=method_label(method, config), linewidth=width)
            if band is not None:
                ax.fill_between(xs, *band, color=colours[method], alpha=0.18, linewidth=0)
            if key == "heldout_acc":
                accuracy_means += means[len(means) // 4:]
    for ax, (key, label, _) in zip(axes, panels):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if accuracy_means:  # the informative range: the later three quarters of every curve, not the first steps
        low, high = min(accuracy_means), max(accuracy_means)
        axes[0].set_ylim(low - 0.15 * (high - low + 1), high + 0.1 * (high - low + 1))
    if any(line.get_ydata().size for line in axes[1].get_lines()):
        axes[1].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    band = f"mean over {seeds} seeds, band ± 1 std" if seeds > 1 else "one seed"
    fig.suptitle(f"{title} ({band})" if title else band)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 5), 1, 1))
    tmp = Path(str(path) + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
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
        plot_curves(out / "curves.png", rows, config.get("methods", ()), title=_figure_title(config), config=config)


def _figure_title(config: Mapping[str, Any]) -> str:
    return f"{config.get('preset', '')}: {config.get('dataset', '')} / {config.get('model', '')}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild summary.md and curves.png of a reproduction run.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    saved = json.loads((args.run_dir / "config.json").read_text())
    config = saved.get("config", saved)  # reproduce.py writes {"config": ..., "environment": ...}
    rows = read_metrics_csv(args.run_dir / "metrics.csv")
    results = json.loads((args.run_dir / "runs.json").read_text())
    write_summary(args.run_dir / "summary.md", rows, results, config)
    plot_curves(args.run_dir / "curves.png", rows, config.get("methods", ()), title=_figure_title(config),
                config=config)
    print((args.run_dir / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
