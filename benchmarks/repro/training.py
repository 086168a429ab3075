"""One (method, seed) run: its training loop, its logged rows, its checkpoints and its result.

Protocol (docs/method.md): the same initialization per seed for every method (the model built right after
``torch.manual_seed(seed)``), constant lr, the same number of optimizer steps for every method, the
same batches per seed (an :class:`~benchmarks.data.EpochSampler` seeded by the seed), held-out
accuracy every ``eval_every`` steps, test accuracy of the best held-out checkpoint. A run depends on
nothing but the configuration, its seed and (GRAFT-ext, NGD) its seed's SB norms, so it gives the same
numbers in any process: serially, in a --jobs worker, or resumed from its checkpoint.
"""

from __future__ import annotations

import math
import pickle
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import data as data_lib
from benchmarks import models as models_lib

from .distributed import Dist, average_gradients
from .evaluation import accuracy_on_test, heldout_accuracy
from .methods import MethodSpec, build_optimizer, ngd_learning_rate, safe_name
from .progress import NoProgress, RunProgress


class Interrupted(RuntimeError):
    """Raised by the --interrupt-after test hook, as if the process had been killed."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, incomplete, or not this run's): the message, one line, names
    the file and the fix."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint file that ``torch.load(..., weights_only=True)`` refuses: it needs more than tensors,
    dicts, lists, tuples, numbers, strings, bools and None, so this script did not write it, and unpickling
    it in full could run arbitrary code."""


@dataclass
class RunContext:
    """What every run of one process shares: the configuration, the data on its device, where to write."""

    config: dict[str, Any]
    data: data_lib.DataSplits
    device: torch.device
    dist: Dist
    out: Path | None
    progress: Callable[[MethodSpec, int, int, int], RunProgress] | None = None  # (spec, seed, start, steps)
    interrupt_after: int | None = None  # test hook: stop after this many steps in this process
    steps_taken: int = 0


@dataclass
class RunOutput:
    """A finished run: its metric rows (one per evaluation), its result row and, for SB, its per-step ‖g‖."""

    rows: list[dict]
    result: dict
    sb_norms: list[float] | None = None


@dataclass
class _Run:
    """Everything one run's loop changes, and what its checkpoint holds."""

    spec: MethodSpec
    seed: int
    hp: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: data_lib.EpochSampler
    aug_gen: torch.Generator
    generator: torch.Generator
    params: list[Tensor]  # the model's parameters that require grad (SB's gradient norm)
    rows: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "step": 0, "state": None})
    norms: list[Tensor] = field(default_factory=list)  # SB: ‖g_t‖ per step
    logged: list[Tensor] = field(default_factory=list)  # (loss, ‖g‖², penalty) per step since the last evaluation
    step: int = 0
    wall: float = 0.0
    diverged_at: int | None = None
    _t0: float = field(default_factory=time.perf_counter)

    def restart_clock(self) -> None:
        self._t0 = time.perf_counter()

    def tick(self) -> None:
        """Add the time since the last tick to the run's wall time."""
        now = time.perf_counter()
        self.wall += now - self._t0
        self._t0 = now

    def label(self) -> str:
        return f"{self.spec.name} seed {self.seed}"


def use_deterministic_kernels(device: torch.device, deterministic: bool = True) -> None:
    """On CUDA, restrict cuDNN to deterministic algorithms (and no autotuning), so that a run gives the same
    numbers in any process (--jobs, --resume); on the CPU the kernels already are."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = False


# -- checkpoints --------------------------------------------------------------------------------------
def checkpoint_path(out: Path | None, seed: int, spec: MethodSpec) -> Path | None:
    return out / "checkpoints" / f"seed{seed}_{safe_name(spec.name)}.pt" if out else None


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# What each kind of checkpoint holds (see _save_checkpoint and train_run's final save).
_PARTIAL_KEYS = ("model", "optimizer", "sampler", "aug_gen", "generator", "rows", "best", "step", "wall_s")
_FINAL_KEYS = ("done", "rows", "result")
_DELETE_IT = "delete it to rerun that run from scratch (the folder's other runs are kept)"


def _reason(err: BaseException) -> str:
    """The exception's type and the first sentence of its message: what failed, in one line."""
    text = re.split(r"(?<=\.)\s|\n", str(err).strip(), maxsplit=1)[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_checkpoint(path: Path) -> dict:
    """A checkpoint this script wrote, unpickled with ``weights_only=True``: only tensors and plain containers
    and scalars come back, so a checkpoint folder from someone else cannot run code; anything else is refused
    with :class:`UnsafeCheckpointError`, without running any of its code. A file that does not read (empty,
    truncated, not a checkpoint) or lacks a key its kind holds raises :class:`CheckpointError`."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message goes on to suggest ways to load it anyway: keep only the reason it gives.
        reason = re.search(r"WeightsUnpickler error: ([^\n]*?)(\.\s|$)", str(err))
        raise UnsafeCheckpointError(
            f"{path}: refused to load: not a checkpoint this script wrote (it needs objects other than "
            "tensors, dicts, lists, numbers and strings, and unpickling those may run arbitrary code"
            f"{': ' + reason.group(1).strip() if reason else ''}). Delete the file to rerun that run from "
            "scratch, or resume only from checkpoint folders you trust."
        ) from None
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises, the file is the problem
        raise CheckpointError(f"{path}: cannot read this checkpoint, it is empty, truncated or not a checkpoint "
                              f"({_reason(err)}): {_DELETE_IT}") from err
    expected = _FINAL_KEYS if isinstance(ck, dict) and ck.get("done") else _PARTIAL_KEYS
    missing = [key for key in expected if not isinstance(ck, dict) or key not in ck]
    if missing:
        raise CheckpointError(f"{path}: an incomplete checkpoint (no {', '.join(missing)}): {_DELETE_IT}")
    return ck


def load_finished(out: Path | None, seed: int, spec: MethodSpec) -> RunOutput | None:
    """The output of a run that finished in an earlier invocation (its final checkpoint), or None."""
    path = checkpoint_path(out, seed, spec)
    if path is None or not path.exists():
        return None
    ck = load_checkpoint(path)
    return RunOutput(ck["rows"], ck["result"], ck.get("sb_norms")) if ck.get("done") else None


def _save_checkpoint(run: _Run, path: Path) -> None:
    # Only tensors (generator states are ByteTensors), plain containers and scalars, so that
    # load_checkpoint can read it back with weights_only=True: no dataclasses, no numpy arrays.
    _save_atomic({
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "sampler": run.sampler.state_dict(),
        "aug_gen": run.aug_gen.get_state(), "generator": run.generator.get_state(), "rows": run.rows,
        "best": run.best, "step": run.step, "wall_s": run.wall,
        "norms": torch.stack(run.norms).tolist() if run.norms else [],
    }, path)


def _restore(run: _Run, ck: dict, device: torch.device) -> None:
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.sampler.load_state_dict(ck["sampler"])
    run.aug_gen.set_state(ck["aug_gen"])
    run.generator.set_state(ck["generator"])
    run.rows, run.best, run.step, run.wall = ck["rows"], ck["best"], ck["step"], ck["wall_s"]
    if run.best["state"] is not None:
        run.best["state"] = {k: v.to(device) for k, v in run.best["state"].items()}
    run.norms = [torch.tensor(v, device=device) for v in ck.get("norms", [])]


def _restore_from(run: _Run, path: Path, device: torch.device) -> None:
    """Continue ``run`` from its partial checkpoint at ``path``; CheckpointError when it does not fit the run (a
    model, optimizer or sampler of another configuration)."""
    ck = load_checkpoint(path)
    try:
        _restore(run, ck, device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointError(f"{path}: does not fit this run ({_reason(err)}): {_DELETE_IT}") from err


def checkpoint_interval(config: dict[str, Any]) -> int:
    """Steps between checkpoints: a multiple of eval_every (so no partial logging interval is lost)."""
    steps, eval_every = int(config["steps"]), int(config["eval_every"])
    every = int(config.get("checkpoint_every") or steps // 20)
    return max(1, math.ceil(every / eval_every)) * eval_every


# -- the run ------------------------------------------------------------------------------------------
def _build(ctx: RunContext, spec: MethodSpec, seed: int, sb_norms: Sequence[float] | None) -> _Run:
    """The run's model (this seed's initialization), optimizer, batch order and random streams."""
    config, data, device = ctx.config, ctx.data, ctx.device
    hp = dict(config["resolved"][spec.name])
    if spec.base == "NGD" and hp["lr"] is None:
        hp["lr"] = ngd_learning_rate(config, sb_norms)
    torch.manual_seed(seed)  # the same initialization for every method of this seed, in any process
    model = models_lib.build_model(config["model"], data.num_classes, data.input_shape[0],
                                   **config["model_kwargs"]).to(device)
    model.train()
    generator = torch.Generator(device=device).manual_seed(10_007 * seed + 17)
    optimizer = build_optimizer(spec, model, hp, config, generator, sb_norms)
    sampler = data_lib.EpochSampler(len(data.train), hp["batch_size"], seed)
    aug_gen = torch.Generator(device=device).manual_seed(7_919 * seed + 3)
    params = [p for p in model.parameters() if p.requires_grad]
    return _Run(spec, seed, hp, model, optimizer, sampler, aug_gen, generator, params)


def _grad_sq_norm(params: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).square().sum() if grads else torch.zeros(())


def _sb_step(run: _Run, x: Tensor, y: Tensor, ctx: Dist) -> Tensor:
    """torch.optim.SGD on the batch; returns (loss, ‖g‖², 0) and records ‖g‖ for grafting and NGD."""
    params = run.params
    run.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(run.model(x), y)
    loss.backward()
    loss = average_gradients(params, loss, ctx)
    sq = _grad_sq_norm(params)
    run.norms.append(sq.sqrt())
    run.optimizer.step()
    return torch.stack([loss.detach(), sq, torch.zeros((), device=sq.device)])


def _train_step(ctx: RunContext, run: _Run, progress: RunProgress) -> bool:
    """One optimizer step on the next batch; False when the step diverged (FloatingPointError)."""
    indices = data_lib.EpochSampler.shard(run.sampler.next(), ctx.dist.rank, ctx.dist.world_size)
    x, y = ctx.data.train_batch(indices, run.aug_gen)
    if run.spec.base == "SB":
        run.logged.append(_sb_step(run, x, y, ctx.dist))
    else:
        def closure(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            logits = run.model(xb)
            return F.cross_entropy(logits, yb), logits

        try:
            run.optimizer.step(closure, (x, y))
        except FloatingPointError as err:
            run.diverged_at = run.step + 1
            progress.write(f"{run.label()}: diverged at step {run.step + 1}: {err}")
            return False
        st = run.optimizer.stats
        run.logged.append(torch.stack([st.loss, st.micro_grad_sq_norm, st.penalty]))
    run.step += 1
    ctx.steps_taken += 1
    return True


def _evaluate_and_log(ctx: RunContext, run: _Run, progress: RunProgress) -> bool:
    """Average the logged interval, evaluate on the held-out split, keep the best state; False on a non-finite loss."""
    train_loss, grad_sq, penalty = torch.stack(run.logged).mean(0).tolist()
    run.logged.clear()
    if not math.isfinite(train_loss):
        run.diverged_at = run.step
        progress.write(f"{run.label()}: non-finite loss at step {run.step}; stopping this run")
        return False
    acc, running_bn_acc = heldout_accuracy(run.model, ctx.data, ctx.config, run.hp["micro_batch_size"], run.seed,
                                           run.step, ctx.dist)
    run.tick()
    row = {"method": run.spec.name, "seed": run.seed, "step": run.step,
           "epoch": run.step * run.hp["batch_size"] / len(ctx.data.train), "train_loss": train_loss,
           "heldout_acc": acc, "micro_grad_sq_norm": grad_sq, "penalty": penalty, "lr": run.hp["lr"],
           "wall_s": run.wall}
    if running_bn_acc is not None:
        row["heldout_acc_running_bn"] = running_bn_acc
    run.rows.append(row)
    if acc > run.best["acc"]:
        run.best = {"acc": acc, "step": run.step,
                    "state": {k: v.detach().clone() for k, v in run.model.state_dict().items()}}
    progress.update(run.step, acc=f"{100 * acc:.2f}", best=f"{100 * run.best['acc']:.2f}", loss=f"{train_loss:.3f}")
    return True


def _finish(ctx: RunContext, run: _Run) -> RunOutput:
    """The run's result: test accuracy of the best held-out state, and its summary numbers."""
    test_acc = math.nan
    if run.best["state"] is not None:
        run.model.load_state_dict(run.best["state"])
        test_acc = accuracy_on_test(run.model, ctx.data, ctx.config, ctx.dist)
    epochs = run.step * run.hp["batch_size"] / len(ctx.data.train)
    result = {
        "method": run.spec.name, "seed": run.seed,
        "best_heldout_acc": run.best["acc"] if run.best["acc"] >= 0 else math.nan, "best_step": run.best["step"],
        "final_heldout_acc": run.rows[-1]["heldout_acc"] if run.rows else math.nan, "test_acc": test_acc,
        "steps": run.step, "epochs": epochs, "wall_s": run.wall, "diverged_at": run.diverged_at,
        "lr": run.hp["lr"], "penalty": run.hp["penalty"], "micro_batch_size": run.hp["micro_batch_size"],
        "batch_size": run.hp["batch_size"],
    }
    sb_norms = torch.stack(run.norms).tolist() if (run.spec.base == "SB" and run.norms) else None
    return RunOutput(run.rows, result, sb_norms)


def train_run(ctx: RunContext, spec: MethodSpec, seed: int, sb_norms: Sequence[float] | None = None) -> RunOutput:
    """Train one (method, seed) from its checkpoint if there is one; checkpoint every few evaluations and at the end."""
    config = ctx.config
    steps, eval_every, ckpt_every = int(config["steps"]), int(config["eval_every"]), checkpoint_interval(config)
    finished = load_finished(ctx.out, seed, spec)
    if finished is not None:
        return finished
    path = checkpoint_path(ctx.out, seed, spec)
    run = _build(ctx, spec, seed, sb_norms)
    if path is not None and path.exists():
        _restore_from(run, path, ctx.device)
    writes = path is not None and ctx.dist.is_main
    progress = ctx.progress(spec, seed, run.step, steps) if ctx.progress and ctx.dist.is_main else NoProgress()
    run.restart_clock()  # a restored run's wall time counts on from here
    try:
        while run.step < steps:
            if ctx.interrupt_after is not None and ctx.steps_taken >= ctx.interrupt_after:
                raise Interrupted(f"interrupted after {ctx.steps_taken} steps (test hook)")
            if not _train_step(ctx, run, progress):
                break
            progress.update(run.step)
            if run.step % eval_every == 0 or run.step == steps:
                if not _evaluate_and_log(ctx, run, progress):
                    break
                if writes and run.step % ckpt_every == 0 and run.step < steps:
                    _save_checkpoint(run, path)
    finally:
        progress.close()
    run.tick()
    output = _finish(ctx, run)
    if writes:
        _save_atomic({"done": True, "rows": output.rows, "result": output.result, "sb_norms": output.sb_norms}, path)
    return output
