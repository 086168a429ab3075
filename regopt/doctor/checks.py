"""The doctor's questions about one model, each a part (see :mod:`regopt.doctor.parts`).

1. :func:`exact_path`: does ``method='exact'`` run (a double backward through every module)?
2. :func:`reference_equality`: does each optimizer's step equal ``regopt.reference`` in float64?
3. :func:`fd_faithfulness`: how close is the finite-difference penalty gradient to the exact one?
4. :func:`regopt.doctor.timing.step_costs`: step time and peak memory against accumulated SGD.
5. :func:`contract`: what the drop-in contract says about this model (frozen, unreached parameters, ...).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import hvp, registry
from ..batching import split_batch
from ..sgd import GradNormSGD
from ..testing import compare_with_reference, cosine_and_relative_error, penalty_gradient
from ..testing.reference_check import bind_model, cast_batch
from .double_backward import graph_is_cut, lacks_double_backward, modules_without_double_backward
from .parts import PartResult, Subject, first_line

MOMENTUM = 0.9  # the reference check's SGD: momentum makes its second step depend on the first
FD_EPS = (1e-2, 1e-3)  # regopt's default ε and a tenth of it
FAITHFUL_REL_ERR, FAITHFUL_COS = 0.1, 0.99  # "FD is safe here": within 10 % of exact, and pointing the same way
REFERENCE_STEPS = 2


def first_micro_batch(subject: Subject) -> Any:
    return split_batch(subject.batch, subject.micro_batch_size)[0].data


def call_on(loss_fn: Callable[..., Any], model: nn.Module, data: Any) -> Any:
    """``loss_fn(model, *parts)`` for a tuple/list, ``(model, **parts)`` for a dict, ``(model, t)`` for a tensor."""
    if isinstance(data, Tensor):
        return loss_fn(model, data)
    if isinstance(data, dict):
        return loss_fn(model, **data)
    return loss_fn(model, *data)


def loss_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


# -- 1. the exact path -------------------------------------------------------------------------------------
def _cut_gradient(subject: Subject, model: nn.Module) -> bool:
    """Whether ∇L_j of the first micro-batch, taken with create_graph, holds a once_differentiable cut."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_of(call_on(subject.loss_fn, model, first_micro_batch(subject)))
    return graph_is_cut(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))


def _exact_failure(subject: Subject, model: nn.Module, error: str, silent: bool) -> PartResult:
    culprits = modules_without_double_backward(
        model, lambda: call_on(subject.loss_fn, model, first_micro_batch(subject)))
    where = ", ".join(culprits) if culprits else "a module the doctor could not isolate"
    how = ("its backward is @once_differentiable, so PyTorch drops the second derivative through it without an "
           "error: method='exact' would compute a wrong penalty gradient" if silent else error)
    fixes = [f"stopped by: {where}", f"why: {how}", "fix: " + exact_fix(culprits, error)]
    subject.exact_available = False
    return PartResult("exact", "exact penalty (double backward)", "fail",
                      f"method='exact' does not work on this model: {_listed(culprits, 3) or where}", fixes,
                      {"exact_runs": False, "silent": silent, "modules": culprits, "error": error})


def _attention(culprits: list[str], error: str) -> bool:
    """Whether fused attention stopped the double backward (by the error's op or the module's class)."""
    return "attention" in error.lower() or any("Attention" in name for name in culprits)


def exact_fix(culprits: list[str], error: str) -> str:
    """The switch that fixes it: fused attention's, a compiled module's, or finite differences."""
    if _attention(culprits, error):
        return ("switch fused attention off: timm models take fused_attn=False (or TIMM_FUSED_ATTN=0 in the "
                "environment); for F.scaled_dot_product_attention run the step under "
                "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`; "
                "or use method='finite_difference'")
    if "donated buffers" in error or any("OptimizedModule" in name for name in culprits):
        return ("a torch.compile'd module has no double backward: use method='finite_difference', with "
                "torch._functorch.config.donated_buffer = False set before the model is compiled")
    return "use method='finite_difference', or replace the module by one whose backward is differentiable"


def _exact_step(subject: Subject, model: nn.Module) -> GradNormSGD:
    """One GN step with method='exact' (λ = ``subject.penalty``, lr 0) on ``model``, under the exact path's kernels."""
    optimizer = GradNormSGD(model.parameters(), 0.0, micro_batch_size=subject.micro_batch_size,
                            penalty=subject.penalty)
    with torch.random.fork_rng(devices=_cuda(subject)), subject.exact_kernels():
        optimizer.step(bind_model(subject.loss_fn, model), subject.batch)
    return optimizer


def _runs_with_math_attention(subject: Subject) -> bool:
    """Whether the exact step runs with scaled_dot_product_attention's math kernel (which has a double backward)."""
    subject.attention_math = True
    runs = False
    try:
        model = copy.deepcopy(subject.model)
        _exact_step(subject, model)
        with subject.exact_kernels():
            runs = not _cut_gradient(subject, model)
    except RuntimeError as error:
        if not lacks_double_backward(error):
            raise
    finally:
        subject.attention_math = runs
    return runs


def exact_path(subject: Subject, deadline: float) -> PartResult:
    """One exact GN step on a copy of the model; on fused attention, again with the math kernel."""
    model = copy.deepcopy(subject.model)
    try:
        optimizer = _exact_step(subject, model)
    except RuntimeError as error:
        if not (isinstance(error, hvp.NoDoubleBackwardError) or lacks_double_backward(error)):
            raise
        result = _exact_failure(subject, model, str(error), silent=False)
        if _attention(result.data["modules"], str(error)) and _runs_with_math_attention(subject):
            subject.exact_available = True
            result.status = "warn"
            result.verdict += ("; it runs with SDPA's math kernel (the switch below), which the later parts use "
                               "for the exact path")
            result.data["runs_with_math_attention"] = True
        return result
    if _cut_gradient(subject, model):
        return _exact_failure(subject, model, "", silent=True)
    subject.exact_available = True
    return PartResult("exact", "exact penalty (double backward)", "ok",
                      "method='exact' runs: every module has a double backward", [],
                      {"exact_runs": True, "penalty": float(optimizer.stats.penalty)})


def _cuda(subject: Subject) -> list:
    return [subject.device] if subject.device.type == "cuda" else []


# -- 2. float64 equality with the naive loop -----------------------------------------------------------
def _compare_one(name: str, subject: Subject) -> dict[str, Any]:
    method = registry.method(name)
    options = method.keep({"lr": subject.lr, "momentum": MOMENTUM, "micro_batch_size": subject.micro_batch_size,
                           "penalty": subject.penalty, "norms": lambda t: 1.0})

    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        return method.build(params, **options)

    with subject.exact_kernels():  # the naive loop's double backward as well as the exact path's
        comparison = compare_with_reference(make, subject.model, subject.loss_fn, subject.batch,
                                            steps=REFERENCE_STEPS)
    first = comparison.failures[0] if comparison.failures else None
    return {"method": name, "status": "ok" if comparison.ok else "fail", "max_rel_err": comparison.max_rel_err,
            "relative_errors": comparison.relative_errors,
            "differs": None if first is None else f"first at step {first.step}: {first.quantity} "
                                                  f"(max abs err {first.abs_err:.3g}) {first.note}".rstrip()}


def _reference_row(name: str, subject: Subject, deadline: float) -> dict[str, Any]:
    if time.perf_counter() > deadline:
        return {"method": name, "status": "skip", "note": "not run: the part's time limit was reached"}
    if registry.method(name).penalized and subject.exact_available is False:
        return {"method": name, "status": "skip", "note": "not run: no double backward (the naive loop needs it too)"}
    try:
        return _compare_one(name, subject)
    except Exception as error:  # e.g. FT/AJ/UJ with a loss_fn that returns no logits
        return {"method": name, "status": "error", "note": first_line(error)}


def _reference_detail(row: dict[str, Any]) -> str:
    """"GN: ok, ‖Δθ‖/‖θ‖ 2e-16, ‖Δgrad‖/‖grad‖ 3e-15", or the row's difference or note."""
    text = f"{row['method']}: {row['status']}"
    if row.get("note"):
        return f"{text}, {row['note']}"
    errors = row.get("relative_errors", {})
    if "param" in errors:
        text += f", ‖Δθ‖/‖θ‖ {errors['param']:.2g}"
    if "grad" in errors:
        text += f", ‖Δgrad‖/‖grad‖ {errors['grad']:.2g}"
    if row.get("differs"):
        text += f"; differs {row['differs']}"
    return text


def reference_equality(subject: Subject, deadline: float) -> PartResult:
    """Every method of :mod:`regopt.registry` (SGD with MOMENTUM) against regopt.reference in float64, for
    REFERENCE_STEPS steps."""
    rows = [_reference_row(name, subject, deadline) for name in registry.NAMES]
    statuses = {row["status"] for row in rows}
    status = "fail" if "fail" in statuses else "warn" if statuses & {"error", "skip"} else "ok"
    matched = [row["method"] for row in rows if row["status"] == "ok"]
    worst = max((row["max_rel_err"] for row in rows if "max_rel_err" in row), default=None)
    verdict = (f"{len(matched)} of {len(rows)} optimizers equal the naive loop in float64"
               + (f" (max relative error {worst:.2g})" if worst is not None else ""))
    details = [_reference_detail(row) for row in rows]
    return PartResult("reference", "float64 equality with regopt.reference", status, verdict, details, {"rows": rows})


# -- 3. finite-difference faithfulness ---------------------------------------------------------------------
def _fd_rows(subject: Subject, exact: list[Tensor], deadline: float) -> list[dict[str, Any]]:
    rows = []
    for eps in FD_EPS:
        if time.perf_counter() > deadline:
            break
        estimate = penalty_gradient(copy.deepcopy(subject.model), subject.loss_fn, subject.batch,
                                    subject.micro_batch_size, method="finite_difference", fd_eps=eps, seed=subject.seed)
        cos, rel = cosine_and_relative_error(estimate, exact)
        rows.append({"fd_eps": eps, "cos": cos, "rel_err": rel,
                     "faithful": rel <= FAITHFUL_REL_ERR and cos >= FAITHFUL_COS})
    return rows


def fd_faithfulness(subject: Subject, deadline: float) -> PartResult:
    """P = Σ_j w_j ∇R_j (GN) by finite differences in the model's dtype at each ε of FD_EPS, against exact in float64."""
    title = "finite-difference faithfulness (GN)"
    if subject.exact_available is False:
        return PartResult("fd", title, "skip", "not measured: without a double backward there is no exact "
                          "reference here; method='finite_difference' is the only choice on this model")
    with subject.exact_kernels():
        exact = penalty_gradient(copy.deepcopy(subject.model).double(), subject.loss_fn, cast_batch(subject.batch, torch.float64),
                                 subject.micro_batch_size, method="exact", seed=subject.seed)
    rows = _fd_rows(subject, exact, deadline)
    safe = [row for row in rows if row["faithful"]]
    details = [f"ε = {row['fd_eps']:g}: relative error {row['rel_err']:.3g}, cosine {row['cos']:.4f}" for row in rows]
    if safe:
        eps = safe[0]["fd_eps"]
        verdict = (f"finite differences are safe here (ε = {eps:g}: within {FAITHFUL_REL_ERR:.0%} of exact)"
                   + ("" if eps == FD_EPS[0] else f"; pass fd_eps={eps:g} (the default {FD_EPS[0]:g} is not)"))
        return PartResult("fd", title, "ok", verdict, details, {"rows": rows, "recommend": "finite_difference"})
    verdict = ("use method='exact': the finite-difference penalty gradient is not within "
               f"{FAITHFUL_REL_ERR:.0%} (cosine ≥ {FAITHFUL_COS}) of the exact one at any ε measured")
    return PartResult("fd", title, "warn", verdict, details, {"rows": rows, "recommend": "exact"})


# -- 5. the drop-in contract -------------------------------------------------------------------------------
def _unreached(subject: Subject) -> list[str]:
    """Trainable parameters that the first micro-batch's loss does not depend on (autograd gives them None)."""
    model = copy.deepcopy(subject.model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    loss = loss_of(call_on(subject.loss_fn, model, first_micro_batch(subject)))
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return [name for (name, _), g in zip(named, grads) if g is None]


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _batch_norm_findings(subject: Subject) -> list[tuple[str, str]]:
    micro_batches = split_batch(subject.batch, subject.micro_batch_size)
    sizes = [micro.size for micro in micro_batches]
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in subject.model.modules())
    findings = []
    if has_bn and subject.model.training and min(sizes) == 1:
        findings.append(("fail", f"BatchNorm with a micro-batch of one example (sizes {sizes}): the step raises "
                                 "ValueError; use a batch size divisible by micro_batch_size, or |M| ≥ 2"))
    elif has_bn:
        findings.append(("info", "BatchNorm statistics are per micro-batch (ghost batch norm), as in the paper"))
    if len(set(sizes)) > 1:
        findings.append(("info", f"the last micro-batch is ragged ({sizes[-1]} of {subject.micro_batch_size} "
                                 "examples): weighted by its size, w_j = |M_j|/|B|"))
    return findings


def contract(subject: Subject, deadline: float) -> PartResult:
    """What the drop-in contract says about this model: frozen and unreached parameters, BatchNorm, eval mode."""
    findings = _batch_norm_findings(subject)
    frozen = [name for name, p in subject.model.named_parameters() if not p.requires_grad]
    if frozen:
        findings.append(("info", f"{len(frozen)} frozen parameter(s) ({_listed(frozen)}): skipped, .grad stays None, "
                                  "as torch.optim skips them"))
    unreached = _unreached(subject)
    if unreached:
        findings.append(("warn", f"{len(unreached)} trainable parameter(s) the first micro-batch's loss does not reach "
                                  f"({_listed(unreached)}): .grad stays None and they are not updated (weight decay "
                                  "and momentum included), as torch.optim does for a None .grad"))
    if not subject.model.training:
        findings.append(("warn", "the model is in eval mode: the steps run as it is (BatchNorm on running "
                                 "statistics, dropout off); call model.train() to train"))
    levels = {level for level, _ in findings}
    status = "fail" if "fail" in levels else "warn" if "warn" in levels else "ok"
    verdict = {"fail": "a step on this model and batch would raise", "warn": "steps run; read the notes",
               "ok": "nothing in the drop-in contract needs your attention"}[status]
    return PartResult("contract", "drop-in contract", status, verdict, [f"[{lvl}] {text}" for lvl, text in findings],
                      {"findings": [{"level": lvl, "text": text} for lvl, text in findings],
                       "frozen": frozen, "unreached": unreached})
