"""The methods of the reproduction: their names, their hyperparameters and their optimizers.

A method name is a base method with optional variant suffixes, in this order::

    NAME   := BASE [ "@λ=" VALUE ] [ "-|M|=" SIZE ] [ "-sub=" COUNT ]
    BASE   := SB | LB | GN | FT | AJ | UJ | GRAFT-iter | GRAFT-ext | NGD
    VALUE  := a finite number >= 0 (0.03, 3e-2); "@lambda=" is accepted for "@λ="; only GN FT AJ UJ take it
    SIZE   := an integer >= 1, the micro-batch size |M|
    COUNT  := an integer >= 1, the micro-batches per step that get the penalty
              (``penalty_micro_batches``; m >= k is the full penalty); only GN FT AJ UJ take it

so ``GN@λ=0.03-|M|=1024`` is GradNormSGD with λ = 0.03 and |M| = 1024, and ``GN-|M|=256-sub=2`` the
same with the penalty on 2 randomly drawn micro-batches of each step (weighted k/2). Each name is one row of the
summary, one curve and its own CSV rows. Names are canonicalized (``GN@lambda=3e-2`` becomes
``GN@λ=0.03``), so two spellings of one variant are one run. A new suffix is one more entry in
``_SUFFIXES`` and one more field of :class:`MethodSpec`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from regopt import registry

BASE_METHODS = ("SB", *registry.NAMES)  # SB: plain torch.optim.SGD on batches of |M|
PENALIZED = registry.PENALIZED
NEEDS_SB = ("GRAFT-ext", "NGD")  # they read this seed's SB run (its norms, its step length)
GRAMMAR = "BASE[@λ=VALUE][-|M|=SIZE][-sub=COUNT]"
_BASE_RE = re.compile("|".join(re.escape(b) for b in sorted(BASE_METHODS, key=len, reverse=True)))
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER_RE = re.compile(r"\d+")


@dataclass(frozen=True)
class MethodSpec:
    """One method of the reproduction: its canonical name, its base method and its variant settings."""

    name: str
    base: str
    micro_batch_size: int | None = None  # None: the config's |M|
    penalty: float | None = None  # λ from the name (``@λ=``); None: from the config's penalty table
    penalty_micro_batches: int | None = None  # m from the name (``-sub=``); None: every micro-batch


# -- the grammar ------------------------------------------------------------------------------------
def _read_penalty(text: str, name: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid λ in {name!r}: expected a finite number >= 0, got {text!r}")
    return value


def _read_size(text: str, name: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"invalid micro-batch size in {name!r}: expected an integer >= 1, got {text!r}")
    return value


def _read_count(text: str, name: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"invalid penalized micro-batch count in {name!r}: expected an integer >= 1, got {text!r}")
    return value


@dataclass(frozen=True)
class _Suffix:
    field: str  # the MethodSpec field it sets
    prefix: re.Pattern  # how it starts (the spellings accepted)
    value: re.Pattern  # what follows the prefix
    read: Callable[[str, str], Any]  # (text, name) -> value, ValueError when out of range
    spell: Callable[[Any], str]  # value -> canonical text
    bases: tuple[str, ...] = BASE_METHODS  # the base methods it applies to
    what: str = ""


_SUFFIXES = (
    _Suffix("penalty", re.compile(r"@(?:λ|lambda)="), _NUMBER_RE, _read_penalty, lambda v: f"@λ={v!r}",
            PENALIZED, "λ"),
    _Suffix("micro_batch_size", re.compile(r"-\|M\|="), _INTEGER_RE, _read_size, lambda v: f"-|M|={v}",
            BASE_METHODS, "micro-batch size"),
    _Suffix("penalty_micro_batches", re.compile(r"-sub="), _INTEGER_RE, _read_count, lambda v: f"-sub={v}",
            PENALIZED, "penalized micro-batch count"),
)


def canonical_name(base: str, **settings: Any) -> str:
    """The name of ``base`` with the given variant settings, suffixes in grammar order."""
    return base + "".join(s.spell(settings[s.field]) for s in _SUFFIXES if settings.get(s.field) is not None)


def parse_method(name: str) -> MethodSpec:
    """Parse a method name of the grammar above into its canonical :class:`MethodSpec`; ValueError says why not."""
    base_match = _BASE_RE.match(name)
    if not base_match:
        raise ValueError(f"unknown method {name!r}: expected {GRAMMAR} with BASE one of {', '.join(BASE_METHODS)}, "
                         "e.g. 'GN', 'GN@λ=0.03' or 'GN-|M|=2560'")
    base, pos, settings, first_allowed = base_match.group(), base_match.end(), {}, 0
    while pos < len(name):
        i = next((j for j, s in enumerate(_SUFFIXES) if s.prefix.match(name, pos)), None)
        if i is None:
            raise ValueError(f"cannot read {name[pos:]!r} in method {name!r}: expected {GRAMMAR}, "
                             "e.g. 'GN@λ=0.03-|M|=1024' or 'GN-|M|=256-sub=2'")
        if i < first_allowed:
            raise ValueError(f"cannot read {name!r}: each variant suffix comes at most once, in the order of "
                             f"{GRAMMAR}")
        suffix = _SUFFIXES[i]
        prefix = suffix.prefix.match(name, pos)
        value = suffix.value.match(name, prefix.end())
        if value is None:
            raise ValueError(f"invalid {suffix.what} in {name!r}: no number after {prefix.group()!r}")
        if base not in suffix.bases:
            raise ValueError(f"{name!r}: a {suffix.what} variant applies only to {', '.join(suffix.bases)}, "
                             f"not {base}")
        settings[suffix.field] = suffix.read(value.group(), name)
        pos, first_allowed = value.end(), i + 1
    return MethodSpec(canonical_name(base, **settings), base, **settings)


def lookup_keys(spec: MethodSpec) -> list[str]:
    """Names whose table entries apply to ``spec``, most specific first: its name, the names with fewer
    variant suffixes (``GN@λ=0.03-|M|=1024`` → ``GN-|M|=1024``, ``GN@λ=0.03``), its base, "default"."""
    present = [s.field for s in _SUFFIXES if getattr(spec, s.field) is not None]
    keys = []
    for size in range(len(present), -1, -1):
        for kept in itertools.combinations(present, size):
            keys.append(canonical_name(spec.base, **{f: getattr(spec, f) for f in kept}))
    return list(dict.fromkeys(keys + ["default"]))


def run_order(methods: Sequence[str]) -> list[MethodSpec]:
    """Parsed methods (duplicate spellings once), SB first; SB is added when GRAFT-ext or NGD needs its run."""
    specs = list({s.name: s for s in map(parse_method, methods)}.values())
    if any(s.base in NEEDS_SB for s in specs) and not any(s.name == "SB" for s in specs):
        specs.insert(0, MethodSpec("SB", "SB"))
    return sorted(specs, key=lambda s: s.name != "SB")


# -- hyperparameters --------------------------------------------------------------------------------
def _lookup(table: Mapping[str, Any], keys: Sequence[str], fallback: Any = None) -> Any:
    return next((table[k] for k in keys if k in table), fallback)


def resolve_hyperparameters(config: Mapping[str, Any], spec: MethodSpec) -> dict[str, Any]:
    """lr, λ, |M| and batch size of one method. Grafting uses SB's lr; NGD's None means 'from SB's run'."""
    lr_table, penalty_table = config["lr"], config["penalty"]
    keys = lookup_keys(spec)
    sb_lr = _lookup(lr_table, ["SB", "default"])
    if spec.base in ("GRAFT-iter", "GRAFT-ext"):
        lr = _lookup(lr_table, keys[:-1], sb_lr)  # not "default": SB's lr
    elif spec.base == "NGD":
        lr = _lookup(lr_table, keys[:-1])  # None: SB's mean step length
    else:
        lr = _lookup(lr_table, keys)
    penalty = None
    if spec.base in PENALIZED:
        penalty = spec.penalty if spec.penalty is not None else float(_lookup(penalty_table, keys, 0.0))
    return {
        "lr": None if lr is None else float(lr),
        "penalty": penalty,
        "micro_batch_size": spec.micro_batch_size or config["micro_batch_size"],
        "batch_size": config["micro_batch_size"] if spec.base == "SB" else config["batch_size"],
    }


def ngd_learning_rate(config: Mapping[str, Any], sb_norms: Sequence[float] | None) -> float:
    """NGD's default lr: SB's mean step length lr_SB · mean_t ‖g_t‖ over this seed's SB run."""
    if not sb_norms:
        raise RuntimeError("NGD's default lr needs this seed's SB run")
    sb = config["resolved"].get("SB") or resolve_hyperparameters(config, MethodSpec("SB", "SB"))
    return sb["lr"] * sum(sb_norms) / len(sb_norms)


def cost_kind(spec: MethodSpec, hp: Mapping[str, Any]) -> tuple[str, int, int]:
    """What a run's duration depends on (for --time-budget estimates): the kind of step and its sizes.
    λ does not change the cost, so λ variants share their base's kind."""
    step = spec.base if spec.base in PENALIZED or spec.base == "SB" else "first-order"
    if spec.penalty_micro_batches is not None:  # the penalty on m of the k micro-batches: another cost
        step += f"-sub={spec.penalty_micro_batches}"
    return step, int(hp["batch_size"]), int(hp["micro_batch_size"])


def safe_name(name: str) -> str:
    """A file-name form of a method name (checkpoints): ``GN@λ=0.03-|M|=1024`` → ``GN_lambda=0.03-M=1024``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name.replace("|M|", "M").replace("@λ=", "_lambda="))


# -- the optimizer of a method -----------------------------------------------------------------------
def build_optimizer(spec: MethodSpec, model: nn.Module, hp: Mapping[str, Any], config: Mapping[str, Any],
                    generator: torch.Generator | None, sb_norms: Sequence[float] | None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    common = dict(lr=hp["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    if spec.base == "SB":
        return torch.optim.SGD(params, **common)
    method = registry.method(spec.base)
    # The generator also draws the penalized micro-batches (-sub=m); GN and AJ draw nothing else.
    options = dict(micro_batch_size=hp["micro_batch_size"], penalty=hp["penalty"], method=config["grad_method"],
                   penalty_micro_batches=spec.penalty_micro_batches, generator=generator)
    if spec.base == "GRAFT-ext":
        options["norms"] = _recorded_norms(sb_norms)
    return method.build(params, **common, **method.keep(options))


def _recorded_norms(sb_norms: Sequence[float] | None) -> Callable[[int], float]:
    """GRAFT-ext's s_t: the norms of this seed's SB run; SB has as many steps as every method, and if it stopped
    early (diverged), its last norm is held."""
    if sb_norms is None:
        raise RuntimeError("GRAFT-ext needs the norms of this seed's SB run")
    recorded = list(sb_norms)
    return lambda t: recorded[min(t, len(recorded) - 1)]


__all__ = ["BASE_METHODS", "GRAMMAR", "MethodSpec", "NEEDS_SB", "PENALIZED", "build_optimizer", "canonical_name",
           "cost_kind", "lookup_keys", "ngd_learning_rate", "parse_method", "resolve_hyperparameters", "run_order",
           "safe_name"]
