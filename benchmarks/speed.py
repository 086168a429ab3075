"""Step time and peak memory of every regopt optimizer against accumulated SGD and regopt.reference.

    python benchmarks/speed.py                      # small BN CNN on CPU, B=256, |M|=32 (< 3 minutes)
    python benchmarks/speed.py --device cuda --model resnet18 --batch 5120 --micro 128

All methods run in one process, interleaved round by round (so drift in machine load hits
them alike), from the same initialization; each reports the median of ``--steps`` timed
steps after ``--warmup`` untimed ones. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import regopt  # noqa: E402
from benchmarks.models import build_model  # noqa: E402
from regopt import reference  # noqa: E402

PENALIZED = {"GN": ("grad_norm", regopt.GradNormSGD, {}), "FT": ("fisher_trace", regopt.FisherTraceSGD, {}),
             "AJ": ("average_jacobian", regopt.JacobianRegSGD, {"kind": "average"}),
             "UJ": ("unit_jacobian", regopt.JacobianRegSGD, {"kind": "unit"})}
GRAFTS = {"GRAFT-iter": "iterative", "GRAFT-ext": "external", "NGD": "normalized"}


def closure_for(model):
    def closure(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return closure


def make_steppers(args, model, penalty):
    """name -> (model copy, step(batch)) for every method, all from the same initialization."""
    steppers = {}

    def add(name, build):
        clone = copy.deepcopy(model)
        steppers[name] = (clone, build(clone))

    def accumulated_sgd(m):
        opt = torch.optim.SGD(m.parameters(), lr=args.lr)

        def step(batch):
            x, y = batch
            opt.zero_grad(set_to_none=False)
            for xb, yb in zip(x.split(args.micro), y.split(args.micro)):
                (F.cross_entropy(m(xb), yb) * (len(xb) / len(x))).backward()
            opt.step()
        return step

    def regopt_step(opt, m):
        return lambda batch: opt.step(closure_for(m), batch)

    add("SGD-accum", accumulated_sgd)
    add("LB", lambda m: regopt_step(regopt.MicroBatchSGD(m.parameters(), lr=args.lr, micro_batch_size=args.micro), m))
    for name, (regularizer, cls, extra) in PENALIZED.items():
        for method in args.methods:
            add(f"{name}-{method}", lambda m, cls=cls, extra=extra, method=method: regopt_step(
                cls(m.parameters(), lr=args.lr, micro_batch_size=args.micro, penalty=penalty, method=method, **extra),
                m))
        if not args.no_reference:
            def reference_step(m, regularizer=regularizer):
                opt = torch.optim.SGD(m.parameters(), lr=args.lr)
                return lambda batch: reference.step(opt, closure_for(m), batch, micro_batch_size=args.micro,
                                                    regularizer=regularizer, penalty=penalty)
            add(f"{name}-reference", reference_step)
    for name, mode in GRAFTS.items():
        norms = (lambda t: 1.0) if mode == "external" else None
        add(name, lambda m, mode=mode, norms=norms: regopt_step(
            regopt.GraftedSGD(m.parameters(), lr=args.lr, micro_batch_size=args.micro, mode=mode, norms=norms), m))
    return steppers


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    in_channels, size = (1, 28) if args.model == "small-cnn" else (3, 32)
    model = build_model(args.model, num_classes=10, in_channels=in_channels).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steppers = make_steppers(args, model, args.penalty)
    if args.only:
        steppers = {k: v for k, v in steppers.items() if k in args.only or k in ("SGD-accum", "LB")}
    batch = (torch.randn(args.batch, in_channels, size, size, device=device),
             torch.randint(0, 10, (args.batch,), device=device))
    if args.channels_last:
        batch = (batch[0].to(memory_format=torch.channels_last), batch[1])
    times = {name: [] for name in steppers}
    peaks = {name: 0 for name in steppers}
    for round_ in range(args.warmup + args.steps):
        for name, (m, step) in steppers.items():
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                step(batch)
            synchronize(device)
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                times[name].append(elapsed)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in steppers:
        ref_name = f"{name.split('-')[0]}-reference"
        rows.append({
            "method": name,
            "ms_per_step": 1e3 * median[name],
            "ratio_to_sgd_accum": median[name] / median["SGD-accum"],
            "ratio_to_lb": median[name] / median["LB"] if "LB" in median else None,
            "ratio_to_reference": median[name] / median[ref_name] if ref_name in median else None,
            "peak_mib": peaks[name] / 2**20 if device.type == "cuda" else None,
            "times_ms": [1e3 * t for t in times[name]],
        })
    return {
        "config": vars(args) | {"torch": torch.__version__, "python": platform.python_version(),
                                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                                else platform.processor() or platform.machine(),
                                "threads": torch.get_num_threads()},
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = ["| method | ms/step | × SGD-accum | × LB | × reference | peak MiB |", "|---|---:|---:|---:|---:|---:|"]
    ratio = lambda value: f"{value:.2f}" if value is not None else ""  # noqa: E731
    for row in result["rows"]:
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "n/a"
        lines.append(f"| {row['method']} | {row['ms_per_step']:.1f} | {row['ratio_to_sgd_accum']:.2f} | "
                     f"{ratio(row['ratio_to_lb'])} | {ratio(row['ratio_to_reference'])} | {peak} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small-cnn", choices=["small-cnn", "resnet18", "vgg11", "vgg16"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--penalty", type=float, default=0.01)
    parser.add_argument("--methods", nargs="+", default=["exact", "finite_difference"],
                        choices=["exact", "finite_difference"])
    parser.add_argument("--only", nargs="+", help="time only these rows (and SGD-accum, LB)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow regopt.reference rows")
    parser.add_argument("--bf16", action="store_true", help="run every step under torch.autocast(bfloat16)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default results/speed/<time>.json)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(f"{args.model} on {result['config']['device_name']} ({args.device}), B={args.batch}, |M|={args.micro}, "
          f"median of {args.steps} steps, torch {torch.__version__}")
    print(markdown(result))
    path = args.json or Path("results/speed") / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result["config"]["json"] = str(path)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
