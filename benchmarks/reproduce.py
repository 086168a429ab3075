"""Reproduce the paper's experiments: small-batch vs large-batch SGD and the mechanisms that close the gap.

    python benchmarks/reproduce.py --preset quick            # the default: Fashion-MNIST, every method, 1-2.5 min on 2 CPU cores
    python benchmarks/reproduce.py --preset fmnist --device cuda
    python benchmarks/reproduce.py --preset cifar10-resnet18 --device cuda --seeds 3 --download
    torchrun --nproc_per_node=4 benchmarks/reproduce.py --preset cifar10-resnet18
    python benchmarks/reproduce.py --resume --out results/quick/20250101-120000

Methods (names used in tables, plots and metrics.csv):

| name | optimizer |
|---|---|
| ``SB`` | torch.optim.SGD on batches of |M| (small-batch SGD) |
| ``LB`` | regopt.MicroBatchSGD on batches of |B| (large-batch SGD, ghost BatchNorm over |M|) |
| ``GN`` ``FT`` ``AJ`` ``UJ`` | regopt.GradNormSGD / FisherTraceSGD / JacobianRegSGD(kind="average" / "unit") |
| ``GRAFT-iter`` | regopt.GraftedSGD(mode="iterative"), lr = SB's lr |
| ``GRAFT-ext`` | regopt.GraftedSGD(mode="external"), norms recorded from this run's SB run (same seed) |
| ``NGD`` | regopt.GraftedSGD(mode="normalized"), lr = SB's mean step length lr·mean_t ‖g_t‖ unless given |
| ``<NAME>-|M|=<n>`` | method NAME with micro-batch size n (the large-micro-batch sweep, e.g. ``GN-|M|=2560``) |

Protocol (SPEC.md): the same initialization per seed for every method, constant lr, momentum 0
and weight decay 0 unless overridden, the same number of optimizer steps for every method,
held-out accuracy every ``eval_every`` steps, test accuracy of the best held-out checkpoint.
Runs that need SB's recorded norms (GRAFT-ext, NGD) run SB first, adding it if not asked for.

Evaluation: in eval mode on the held-out split. With ``bn_recalibrate = n > 0`` every BatchNorm's
running statistics are first recomputed (cumulative average, momentum=None) from n unaugmented
training micro-batches of |M| examples, so that evaluation does not depend on the last ~10
micro-batches' statistics, which at a high learning rate lag behind the weights (worth +0.3 to
+0.4 points of held-out accuracy on average in the Fashion-MNIST probes, see
benchmarks/RESULTS_fmnist.md). Training itself never reads running statistics, so this changes
what is measured, not the trajectory.

Under ``torchrun`` every rank draws the same global batch and trains on its own contiguous
shard (regopt's optimizers all-reduce over the world group; SB averages its gradient with
one all-reduce), evaluation is sharded, and only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import regopt
from benchmarks import data as data_lib
from benchmarks import models as models_lib
from benchmarks import report

BASE_METHODS = ("SB", "LB", "GN", "FT", "AJ", "UJ", "GRAFT-iter", "GRAFT-ext", "NGD")
PENALIZED = ("GN", "FT", "AJ", "UJ")
_METHOD_RE = re.compile(r"^(?P<base>SB|LB|GN|FT|AJ|UJ|GRAFT-iter|GRAFT-ext|NGD)(?:-\|M\|=(?P<micro>\d+))?$")

# -- presets ----------------------------------------------------------------------------------------
_PAPER_PENALTIES = {"GN": 0.01, "FT": 0.01, "AJ": 1e-3, "UJ": 1e-3}

PRESETS: dict[str, dict[str, Any]] = {
    # Proves the pipeline end to end in a few minutes on 2 CPU cores; too short to show the paper's effect.
    "quick": dict(
        description="Fashion-MNIST, small BN CNN (8-16-32), every method; a pipeline check (minutes on CPU), "
                    "far too short to show the paper's effect",
        dataset="fashion-mnist", model="small-cnn", model_kwargs={"widths": [8, 16, 32]},
        batch_size=256, micro_batch_size=32, steps=40, eval_every=5, eval_size=2000, test_size=2000,
        bn_recalibrate=4, seeds=1, cpu_threads=1,  # tiny ops: one thread beats two, and never oversubscribes
        methods=list(BASE_METHODS) + ["GN-|M|=128"],
        lr={"default": 0.1}, penalty=dict(_PAPER_PENALTIES),
    ),
    # Calibrated by CPU probes (benchmarks/RESULTS_fmnist.md): the first 10,000 training images, so that SB
    # trains ~38 epochs in 3,000 steps and LB reaches ~zero training loss. In those probes (SB, LB only) the
    # SB−LB test gap was small, +0.49 and +0.33 points on two seeds: this preset measures it, it does not
    # promise more. Estimated (not measured) at about 10 minutes on one H100.
    "fmnist": dict(
        description="Fashion-MNIST (first 10,000 training images), BN CNN 16-32-64, |B|=1024, |M|=128, "
                    "lr 0.1, 3,000 steps: the calibrated small setting (see benchmarks/RESULTS_fmnist.md)",
        dataset="fashion-mnist", train_size=10_000, model="small-cnn", model_kwargs={"widths": [16, 32, 64]},
        batch_size=1024, micro_batch_size=128, steps=3000, eval_every=50, eval_size=None, test_size=None,
        bn_recalibrate=8, seeds=2,
        methods=["SB", "LB", "GN", "FT", "AJ", "UJ", "GRAFT-ext", "GN-|M|=1024"],
        lr={"default": 0.1}, penalty=dict(_PAPER_PENALTIES),
    ),
    "cifar10-resnet18": dict(
        description="the paper's ResNet-18 / CIFAR-10 protocol and hyperparameters",
        dataset="cifar10", model="resnet18", model_kwargs={},
        batch_size=5120, micro_batch_size=128, steps=5000, eval_every=20, eval_size=None, test_size=None,
        bn_recalibrate=0, seeds=1,
        methods=list(BASE_METHODS) + ["GN-|M|=2560"],
        lr={"default": 0.1}, penalty={"GN": 0.01, "FT": 0.01, "AJ": 1e-3, "UJ": 1e-3},
        paper_test_acc={"SB": 92.64, "LB": 89.83, "GN": 91.75, "FT": 91.50, "AJ": 90.13, "UJ": 90.15,
                        "GRAFT-iter": 92.12, "GRAFT-ext": 92.16, "NGD": 92.10, "GN-|M|=2560": 65.09},
    ),
    "cifar100-resnet18": dict(
        description="the paper's ResNet-18 / CIFAR-100 protocol and hyperparameters",
        dataset="cifar100", model="resnet18", model_kwargs={},
        batch_size=5120, micro_batch_size=128, steps=5000, eval_every=20, eval_size=None, test_size=None,
        bn_recalibrate=0, seeds=1,
        methods=list(BASE_METHODS) + ["FT-|M|=2560"],
        lr={"default": 0.1, "LB": 0.5}, penalty={"GN": 0.01, "FT": 0.01, "AJ": 5e-5, "UJ": 1e-3},
        paper_test_acc={"SB": 71.31, "LB": 67.27, "GN": 70.65, "FT": 71.20, "AJ": 66.08, "UJ": 66.26,
                        "GRAFT-iter": 68.30, "GRAFT-ext": 68.40, "NGD": 66.83, "FT-|M|=2560": 64.89},
    ),
    "cifar10-vgg11": dict(
        description="the paper's VGG-11 (no BatchNorm) / CIFAR-10 protocol and hyperparameters",
        dataset="cifar10", model="vgg11", model_kwargs={},
        batch_size=5120, micro_batch_size=128, steps=5000, eval_every=20, eval_size=None, test_size=None,
        bn_recalibrate=0, seeds=1,
        methods=["SB", "LB", "GN", "FT", "AJ"],
        lr={"SB": 0.15, "default": 0.01}, penalty={"GN": 0.5, "FT": 0.5, "AJ": 2e-5},
        paper_test_acc={"SB": 78.19, "LB": 73.90, "GN": 77.62, "FT": 78.40, "AJ": 74.09},
    ),
}

DEFAULTS: dict[str, Any] = dict(
    momentum=0.0, weight_decay=0.0, grad_method="finite_difference", checkpoint_every=None, eval_batch_size=1000,
    data_root=None, download=False, synthetic=None, paper_test_acc=None, train_size=None, heldout_size=None,
    cpu_threads=None,
)


# -- methods ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    name: str
    base: str
    micro_batch_size: int | None = None  # None: the config's |M|


def parse_method(name: str) -> MethodSpec:
    match = _METHOD_RE.match(name)
    if not match:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(BASE_METHODS)}, "
                         "optionally with a micro-batch size, e.g. 'GN-|M|=2560'")
    micro = match.group("micro")
    if micro is not None and int(micro) < 1:
        raise ValueError(f"invalid micro-batch size in {name!r}")
    return MethodSpec(name, match.group("base"), int(micro) if micro else None)


def _lookup(table: dict[str, Any], spec: MethodSpec, fallback: Any = None) -> Any:
    for key in (spec.name, spec.base, "default"):
        if key in table:
            return table[key]
    return fallback


def resolve_hyperparameters(config: dict[str, Any], spec: MethodSpec) -> dict[str, Any]:
    """lr, λ, |M| and batch size of one method. Grafting uses SB's lr; NGD's None means 'from SB'."""
    lr_table, penalty_table = config["lr"], config["penalty"]
    sb_lr = _lookup(lr_table, MethodSpec("SB", "SB"))
    if spec.base in ("GRAFT-iter", "GRAFT-ext"):
        lr = lr_table.get(spec.name, lr_table.get(spec.base, sb_lr))
    elif spec.base == "NGD":
        lr = lr_table.get(spec.name, lr_table.get(spec.base))  # None: SB's mean step length
    else:
        lr = _lookup(lr_table, spec)
    micro = spec.micro_batch_size or config["micro_batch_size"]
    return {
        "lr": None if lr is None else float(lr),
        "penalty": float(_lookup(penalty_table, spec, 0.0)) if spec.base in PENALIZED else None,
        "micro_batch_size": micro,
        "batch_size": config["micro_batch_size"] if spec.base == "SB" else config["batch_size"],
    }


def run_order(methods: Sequence[str]) -> list[MethodSpec]:
    """Parsed methods with SB first; SB is added when GRAFT-ext or NGD needs its norms."""
    specs = [parse_method(m) for m in dict.fromkeys(methods)]
    needs_sb = any(s.base in ("GRAFT-ext", "NGD") for s in specs)
    if needs_sb and not any(s.name == "SB" for s in specs):
        specs.insert(0, MethodSpec("SB", "SB"))
    return sorted(specs, key=lambda s: s.name != "SB")


def build_optimizer(spec: MethodSpec, model: nn.Module, hp: dict[str, Any], config: dict[str, Any],
                    generator: torch.Generator | None, sb_norms: list[float] | None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    common = dict(lr=hp["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    if spec.base == "SB":
        return torch.optim.SGD(params, **common)
    micro = dict(micro_batch_size=hp["micro_batch_size"])
    if spec.base == "LB":
        return regopt.MicroBatchSGD(params, **common, **micro)
    penalized = dict(penalty=hp["penalty"], method=config["grad_method"], **micro)
    if spec.base == "GN":
        return regopt.GradNormSGD(params, **common, **penalized)
    if spec.base == "FT":
        return regopt.FisherTraceSGD(params, **common, generator=generator, **penalized)
    if spec.base in ("AJ", "UJ"):
        kind = "average" if spec.base == "AJ" else "unit"
        return regopt.JacobianRegSGD(params, **common, kind=kind, generator=generator, **penalized)
    if spec.base == "GRAFT-iter":
        return regopt.GraftedSGD(params, **common, mode="iterative", **micro)
    if spec.base == "GRAFT-ext":
        if sb_norms is None:
            raise RuntimeError("GRAFT-ext needs the norms of this seed's SB run")
        recorded = list(sb_norms)
        # SB has as many steps as every method; if it stopped early (diverged), its last norm is held.
        return regopt.GraftedSGD(params, **common, mode="external",
                                 norms=lambda t: recorded[min(t, len(recorded) - 1)], **micro)
    if spec.base == "NGD":
        return regopt.GraftedSGD(params, **common, mode="normalized", **micro)
    raise ValueError(spec.name)


# -- distributed ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """Initialize torch.distributed under torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    info = Dist(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Dist()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return info, torch.device("cuda", local)
    return info, torch.device(device)


def _broadcast_object(obj: Any, ctx: Dist) -> Any:
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sum_across(values: Tensor, ctx: Dist) -> Tensor:
    if ctx.world_size > 1:
        dist.all_reduce(values)
    return values


# -- evaluation -------------------------------------------------------------------------------------
def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: data_lib.DataSplits, num_batches: int, batch_size: int,
                          seed: int) -> None:
    """Recompute BatchNorm running statistics as the average over ``num_batches`` unaugmented training
    micro-batches of ``batch_size`` (the training BN batch size), drawn by ``seed``; same on every rank."""
    layers = _bn_layers(model)
    if not layers or num_batches <= 0:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    g = torch.Generator().manual_seed(seed)
    n = len(data.train)
    indices = torch.randperm(n, generator=g)[: num_batches * batch_size].to(data.device)
    for chunk in indices.split(batch_size):
        model(data.normalize(data.train.images[chunk]))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, data: data_lib.DataSplits, split: str, batch_size: int, limit: int | None,
             ctx: Dist) -> float:
    """Accuracy on the first ``limit`` examples of ``split`` in eval mode (sharded over ranks)."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=data.device)
    for i, (x, y) in enumerate(data.eval_batches(split, batch_size, limit)):
        if i % ctx.world_size != ctx.rank:
            continue
        stats[0] += (model(x).argmax(1) == y).sum()
        stats[1] += y.numel()
    stats = _sum_across(stats, ctx)
    model.train(was_training)
    correct, total = stats.tolist()
    return correct / max(total, 1.0)


def _broadcast_buffers(model: nn.Module, ctx: Dist) -> None:
    if ctx.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# -- one run ----------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name.replace("|M|", "M"))


def _grad_sq_norm(params: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).square().sum() if grads else torch.zeros(())


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class Interrupted(RuntimeError):
    """Raised by the --interrupt-after test hook, as if the process had been killed."""


@dataclass
class RunContext:
    config: dict[str, Any]
    data: data_lib.DataSplits
    device: torch.device
    dist: Dist
    out: Path | None
    progress: bool = True
    interrupt_after: int | None = None  # test hook: stop after this many steps in this process
    steps_taken: int = 0


def train_run(ctx: RunContext, spec: MethodSpec, seed: int, init_state: dict[str, Tensor],
              sb_norms: list[float] | None) -> tuple[list[dict], dict, list[float] | None]:
    """Train one (method, seed); returns its metric rows, its result and (for SB) its per-step ‖g‖."""
    config, data, device = ctx.config, ctx.data, ctx.device
    hp = dict(config["resolved"][spec.name])
    steps, eval_every = int(config["steps"]), int(config["eval_every"])
    # Checkpoints fall on evaluation steps (so no partial logging interval is lost): a multiple of eval_every.
    ckpt_every = int(config.get("checkpoint_every") or steps // 20)
    ckpt_every = max(1, math.ceil(ckpt_every / eval_every)) * eval_every
    ckpt_path = ctx.out / "checkpoints" / f"seed{seed}_{_safe(spec.name)}.pt" if ctx.out else None

    if spec.base == "NGD" and hp["lr"] is None:
        if not sb_norms:
            raise RuntimeError("NGD's default lr needs this seed's SB run")
        sb_lr = config["resolved"]["SB"]["lr"] if "SB" in config["resolved"] else resolve_hyperparameters(
            config, MethodSpec("SB", "SB"))["lr"]
        hp["lr"] = sb_lr * sum(sb_norms) / len(sb_norms)

    model = models_lib.build_model(config["model"], data.num_classes, data.input_shape[0],
                                   **config["model_kwargs"]).to(device)
    model.load_state_dict(init_state)
    model.train()
    generator = torch.Generator(device=device).manual_seed(10_007 * seed + 17)
    optimizer = build_optimizer(spec, model, hp, config, generator, sb_norms)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = data_lib.EpochSampler(len(data.train), hp["batch_size"], seed)
    aug_gen = torch.Generator(device=device).manual_seed(7_919 * seed + 3)

    rows: list[dict] = []
    best = {"acc": -1.0, "step": 0, "state": None}
    norms: list[Tensor] = []  # SB: ‖g_t‖ per step
    start, wall = 0, 0.0
    diverged_at = None
    if ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("done"):
            return ck["rows"], ck["result"], ck.get("sb_norms")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        sampler.load_state_dict(ck["sampler"])
        aug_gen.set_state(ck["aug_gen"])
        generator.set_state(ck["generator"])
        rows, best, start, wall = ck["rows"], ck["best"], ck["step"], ck["wall_s"]
        if best["state"] is not None:
            best["state"] = {k: v.to(device) for k, v in best["state"].items()}
        norms = [torch.tensor(v, device=device) for v in ck.get("norms", [])]

    def closure(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def checkpoint(step: int) -> None:
        if ckpt_path is None or not ctx.dist.is_main:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
            "aug_gen": aug_gen.get_state(), "generator": generator.get_state(), "rows": rows, "best": best,
            "step": step, "wall_s": wall, "norms": torch.stack(norms).tolist() if norms else [],
        }, ckpt_path)

    bar = None
    if ctx.progress and ctx.dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"{spec.name:>12} seed {seed}", dynamic_ncols=True, leave=True,
                   file=sys.stderr)
    logged: list[Tensor] = []
    examples_per_step = hp["batch_size"]
    zero = torch.zeros((), device=device)
    t0 = time.perf_counter()
    step = start
    try:
        while step < steps:
            if ctx.interrupt_after is not None and ctx.steps_taken >= ctx.interrupt_after:
                raise Interrupted(f"interrupted after {ctx.steps_taken} steps (test hook)")
            indices = data_lib.EpochSampler.shard(sampler.next(), ctx.dist.rank, ctx.dist.world_size)
            x, y = data.train_batch(indices, aug_gen)
            if spec.base == "SB":
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if ctx.dist.world_size > 1:
                    grads = [p.grad for p in params]
                    flat = torch._utils._flatten_dense_tensors(grads)
                    dist.all_reduce(flat)
                    flat /= ctx.dist.world_size
                    for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                        g.copy_(f)
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)
                    loss /= ctx.dist.world_size
                sq = _grad_sq_norm(params)
                norms.append(sq.sqrt())
                optimizer.step()
                logged.append(torch.stack([loss.detach(), sq, zero]))
            else:
                try:
                    optimizer.step(closure, (x, y))
                except FloatingPointError as err:
                    diverged_at = step + 1
                    if bar is not None:
                        bar.write(f"{spec.name} seed {seed}: diverged at step {step + 1}: {err}")
                    break
                st = optimizer.stats
                logged.append(torch.stack([st.loss, st.micro_grad_sq_norm, st.penalty]))
            step += 1
            ctx.steps_taken += 1
            if bar is not None:
                bar.update(1)
            if step % eval_every == 0 or step == steps:
                train_loss, grad_sq, penalty = torch.stack(logged).mean(0).tolist()
                logged.clear()
                if not math.isfinite(train_loss):
                    diverged_at = step
                    if bar is not None:
                        bar.write(f"{spec.name} seed {seed}: non-finite loss at step {step}; stopping this run")
                    break
                running_bn_acc = None
                if config.get("compare_bn_eval") and config["bn_recalibrate"] > 0:  # calibration diagnostic
                    running_bn_acc = evaluate(model, data, "heldout", config["eval_batch_size"],
                                              config["eval_size"], ctx.dist)
                recalibrate_batchnorm(model, data, config["bn_recalibrate"], hp["micro_batch_size"],
                                      seed=1_000 * seed + step)
                if config["bn_recalibrate"] <= 0:
                    _broadcast_buffers(model, ctx.dist)
                acc = evaluate(model, data, "heldout", config["eval_batch_size"], config["eval_size"], ctx.dist)
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                rows.append({
                    "method": spec.name, "seed": seed, "step": step,
                    "epoch": step * examples_per_step / len(data.train),
                    "train_loss": train_loss, "heldout_acc": acc, "micro_grad_sq_norm": grad_sq,
                    "penalty": penalty, "lr": hp["lr"], "wall_s": wall,
                })
                if running_bn_acc is not None:
                    rows[-1]["heldout_acc_running_bn"] = running_bn_acc
                if acc > best["acc"]:
                    best = {"acc": acc, "step": step,
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                if bar is not None:
                    bar.set_postfix(acc=f"{100 * acc:.2f}", best=f"{100 * best['acc']:.2f}", loss=f"{train_loss:.3f}",
                                    refresh=False)
                if step % ckpt_every == 0 and step < steps:
                    checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
    wall += time.perf_counter() - t0

    test_acc = math.nan
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        test_acc = evaluate(model, data, "test", config["eval_batch_size"], config.get("test_size"), ctx.dist)
    final_acc = rows[-1]["heldout_acc"] if rows else math.nan
    result = {
        "method": spec.name, "seed": seed, "best_heldout_acc": best["acc"] if best["acc"] >= 0 else math.nan,
        "best_step": best["step"], "final_heldout_acc": final_acc, "test_acc": test_acc, "steps": step,
        "epochs": step * examples_per_step / len(data.train), "wall_s": wall, "diverged_at": diverged_at,
        "lr": hp["lr"], "penalty": hp["penalty"], "micro_batch_size": hp["micro_batch_size"],
        "batch_size": hp["batch_size"],
    }
    sb_out = torch.stack(norms).tolist() if (spec.base == "SB" and norms) else None
    if ckpt_path is not None and ctx.dist.is_main:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({"done": True, "rows": rows, "result": result, "sb_norms": sb_out}, ckpt_path)
    return rows, result, sb_out


# -- config -----------------------------------------------------------------------------------------
def _parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, float]:
    """``["SB=0.1", "0.05"]`` -> {"SB": 0.1, "default": 0.05}."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.rpartition("=") if "=" in item else ("default", "=", item)
        key = key or "default"
        try:
            out[key] = float(value)
        except ValueError:
            raise SystemExit(f"--{what}: cannot read {item!r} (expected METHOD=VALUE or VALUE)") from None
    return out


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.preset not in PRESETS:
        raise SystemExit(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    config = copy.deepcopy(DEFAULTS)
    config.update(copy.deepcopy(PRESETS[args.preset]))
    config["preset"] = args.preset
    overrides = {
        "dataset": args.dataset, "model": args.model, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "steps": args.steps, "eval_every": args.eval_every,
        "eval_size": args.eval_size, "seeds": args.seeds, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "grad_method": args.method, "bn_recalibrate": args.bn_recalibrate,
        "checkpoint_every": args.checkpoint_every, "data_root": args.data_root, "train_size": args.train_size,
        "heldout_size": args.heldout_size,
        "compare_bn_eval": args.compare_bn_eval or None, "first_seed": args.first_seed,
    }
    config.update({k: v for k, v in overrides.items() if v is not None})
    if args.eval_size is not None and args.eval_size <= 0:
        config["eval_size"] = None
    if args.test_size is not None:
        config["test_size"] = args.test_size if args.test_size > 0 else None
    if args.widths:
        config["model_kwargs"] = {**config["model_kwargs"], "widths": args.widths}
    if args.dataset is not None and args.dataset != PRESETS[args.preset]["dataset"]:
        config["paper_test_acc"] = None
    if args.model is not None and args.model != PRESETS[args.preset]["model"]:
        config["model_kwargs"] = {"widths": args.widths} if args.widths else {}
    if config["dataset"] == "synthetic":
        config["synthetic"] = config.get("synthetic") or {}
    if args.methods:
        config["methods"] = list(args.methods)
    config["lr"] = {**config["lr"], **_parse_assignments(args.lr, "lr")}
    config["penalty"] = {**config["penalty"], **_parse_assignments(args.penalty, "penalty")}
    config["download"] = bool(args.download)
    _validate(config)
    return config


def _validate(config: dict[str, Any]) -> None:
    for key in ("batch_size", "micro_batch_size", "steps", "eval_every", "seeds"):
        if int(config[key]) < 1:
            raise SystemExit(f"{key} must be >= 1, got {config[key]}")
    if config["grad_method"] not in ("exact", "finite_difference"):
        raise SystemExit(f"--method must be 'exact' or 'finite_difference', got {config['grad_method']!r}")
    try:
        specs = run_order(config["methods"])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    config["methods"] = [s.name for s in specs]
    config["resolved"] = {s.name: resolve_hyperparameters(config, s) for s in specs}


def environment(device: torch.device, ctx: Dist) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "regopt": regopt.__version__}
    for name in ("torchvision", "numpy", "matplotlib", "tqdm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"versions": versions, "device_name": device_name, "platform": platform.platform(),
            "git_commit": commit, "world_size": ctx.world_size, "argv": sys.argv,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def load_data(config: dict[str, Any]) -> data_lib.DataSplits:
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


# -- main -------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Reproduce Novack et al. (ICLR 2023): SB vs LB SGD and the regularizers/grafting that close "
                    "the gap. Writes summary.md, curves.png, metrics.csv and config.json.",
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="quick", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/<preset>/<timestamp>)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (first-seed .. first-seed+N-1)")
    p.add_argument("--first-seed", type=int, default=None, help="first seed (default 0)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of SB LB GN FT AJ UJ GRAFT-iter GRAFT-ext NGD, or NAME-|M|=n (quote it)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    p.add_argument("--download", action="store_true", help="download the data set through torchvision if absent")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest under results/<preset>/) from its checkpoints")
    p.add_argument("--method", default=None, choices=["exact", "finite_difference"],
                   help="how GN/FT/AJ/UJ differentiate the penalty (default: finite_difference, the fast path; exact = double backprop)")
    p.add_argument("--lr", nargs="+", default=None, metavar="[METHOD=]LR", help="learning rates, e.g. SB=0.1 NGD=0.5")
    p.add_argument("--penalty", nargs="+", default=None, metavar="[METHOD=]LAMBDA", help="λ, e.g. GN=0.01")
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--interrupt-after", type=int, default=None, help=argparse.SUPPRESS)  # test hook
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = make_parser().parse_args(argv)
    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx_dist, device = setup_distributed(device_kind)

    if args.resume:
        out = args.out
        if out is None:
            candidates = sorted((Path("results") / args.preset).glob("*/config.json"))
            if not candidates:
                raise SystemExit(f"--resume: no run under results/{args.preset}/; pass --out")
            out = candidates[-1].parent
        if not (out / "config.json").exists():
            raise SystemExit(f"--resume: {out}/config.json not found")
        config = json.loads((out / "config.json").read_text())["config"]
    else:
        config = build_config(args)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or Path("results") / config["preset"] / _broadcast_object(stamp, ctx_dist)
    config["device"] = device_kind
    threads = args.threads or (config.get("cpu_threads") if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    env = environment(device, ctx_dist)
    config["device_name"] = env["device_name"]
    if ctx_dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            report.write_json(out / "config.json", {"config": config, "environment": env})

    try:
        data = load_data(config).to(device)
    except data_lib.DatasetNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    ctx = RunContext(config, data, device, ctx_dist, out, progress=not args.no_progress,
                     interrupt_after=args.interrupt_after)
    if ctx_dist.is_main:
        print(f"preset {config['preset']}: {config.get('description', '')}\n"
              f"data {data.name} from {data.source}: train {len(data.train)}, held-out {len(data.heldout)}, "
              f"test {len(data.test)}; device {env['device_name']}; world size {ctx_dist.world_size}\n"
              f"output {out}", file=sys.stderr)

    rows: list[dict] = []
    results: list[dict] = []
    specs = run_order(config["methods"])
    first = int(config.get("first_seed") or 0)
    for seed in range(first, first + int(config["seeds"])):
        torch.manual_seed(seed)
        init_model = models_lib.build_model(config["model"], data.num_classes, data.input_shape[0],
                                            **config["model_kwargs"])
        init_state = {k: v.to(device) for k, v in init_model.state_dict().items()}
        sb_norms = None
        for i, spec in enumerate(specs):
            run_rows, result, norms = train_run(ctx, spec, seed, init_state, sb_norms)
            if spec.name == "SB":
                sb_norms = norms
            rows += run_rows
            results.append(result)
            if ctx_dist.is_main:  # the plot once per seed, the tables after every run
                report.write_all(out, rows, results, config, plot=i == len(specs) - 1)
    if ctx_dist.is_main:
        print((out / "summary.md").read_text())
        print(f"wrote {out}/summary.md, curves.png, metrics.csv, runs.json, config.json", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
