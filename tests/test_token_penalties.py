"""Token-level FT, AJ and UJ: logits [n, …, C], each position an example, an optional mask of kept positions.

Checked three ways: the penalty scalars against a loop over positions in float64 (written here, sharing
nothing with regopt); the optimizers' steps against regopt.reference; and [n, C] logits, which must give
exactly what they gave before (the equivalence suite's reference comparisons cover that bit for bit).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import penalties, reference
from regopt.batching import call_closure, split_batch

TOKEN_REGULARIZERS = ("fisher_trace", "average_jacobian", "unit_jacobian")
PENALTIES = {"fisher_trace": penalties.FISHER_TRACE, "average_jacobian": penalties.AVERAGE_JACOBIAN,
             "unit_jacobian": penalties.UNIT_JACOBIAN}


def _loop_scalar(regularizer, logits, draw, mask):
    """S_j position by position: the kept positions' CE against their label, or their logits' sum or projection,
    averaged over the kept positions (0 when none is kept). ``draw`` holds one label per position for FT."""
    classes = logits.shape[-1]
    terms = []
    for i, f in enumerate(logits.reshape(-1, classes)):
        if mask is not None and not mask.reshape(-1)[i]:
            continue
        if regularizer == "fisher_trace":
            terms.append(-torch.log_softmax(f, dim=0)[draw[i]])
        elif regularizer == "average_jacobian":
            terms.append(f.sum())
        else:
            terms.append(f @ draw)
    return sum(terms) / len(terms) if terms else logits.sum() * 0.0


class TinyLM(nn.Module):
    """Embedding → tanh mixing with the previous token → vocabulary logits [n, T, V], float64."""

    def __init__(self, vocab=7, width=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width).double()
        self.mix = nn.Linear(2 * width, width).double()
        self.head = nn.Linear(width, vocab).double()

    def forward(self, tokens):
        e = self.embed(tokens)
        previous = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.head(torch.tanh(self.mix(torch.cat([e, previous], dim=-1))))


def _lm_batch(size=6, length=5, vocab=7, seed=1, padded=True):
    """Tokens and labels (labels = tokens; the last positions of some rows are padding, label -100)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (size, length), generator=g)
    labels = tokens.clone()
    if padded:
        for row in range(size):
            labels[row, length - row % 3:] = -100
    return tokens, labels


def _causal_loss_fn(model, masked):
    """The usual causal-LM recipe: logits[:, :-1] predict labels[:, 1:]; ignored labels are -100."""
    def loss_fn(tokens, labels):
        logits = model(tokens)[:, :-1]
        targets = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return (loss, logits, targets != -100) if masked else (loss, logits)
    return loss_fn


@pytest.mark.parametrize("regularizer", TOKEN_REGULARIZERS)
@pytest.mark.parametrize("shape", [(4, 3), (3, 4, 5), (2, 3, 2, 6), (2, 9, 50)])  # the last: GPT-2-like [n, T, V]
@pytest.mark.parametrize("masked", [False, True])
def test_penalty_scalar_and_its_gradient_equal_a_loop_over_positions(regularizer, shape, masked):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(shape[:-1], generator=g) < 0.6 if masked else None
    if masked:
        mask.view(-1)[0] = True  # at least one kept position (none kept: its own test)
    penalty = PENALTIES[regularizer]
    draw = penalty.sample(logits, torch.Generator().manual_seed(5))
    if regularizer == "fisher_trace":
        assert draw.shape == (logits[..., 0].numel(),)  # one label per position, kept or not
    ours = penalty.scalar(None, logits, draw, mask)
    theirs = _loop_scalar(regularizer, logits, draw, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    ours_grad, = torch.autograd.grad(ours, logits)
    theirs_grad, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-14)
    if masked:
        assert torch.equal(ours_grad[~mask], torch.zeros_like(ours_grad[~mask]))  # left-out positions: no gradient


@pytest.mark.parametrize("regularizer", TOKEN_REGULARIZERS)
def test_two_dim_logits_give_exactly_the_per_example_penalty(regularizer):
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    penalty = PENALTIES[regularizer]
    draw = penalty.sample(logits, torch.Generator().manual_seed(1))
    per_example = {"fisher_trace": lambda: F.cross_entropy(logits, draw),
                   "average_jacobian": lambda: logits.mean(dim=0).sum(),
                   "unit_jacobian": lambda: logits.mean(dim=0, dtype=draw.dtype) @ draw}[regularizer]()
    assert torch.equal(penalty.scalar(None, logits, draw), per_example)
    all_kept = penalty.scalar(None, logits, draw, torch.ones(6, dtype=torch.bool))  # Σ/K rather than mean: rounding
    torch.testing.assert_close(all_kept, per_example, rtol=1e-14, atol=0)


@pytest.mark.parametrize("regularizer", TOKEN_REGULARIZERS)
def test_penalty_matches_reference_scalar_with_and_without_mask(regularizer):
    logits = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) < 0.5
    ours_draw = PENALTIES[regularizer].sample(logits, torch.Generator().manual_seed(4))
    spec_draw = reference._penalty_draw(regularizer, logits, torch.Generator().manual_seed(4))
    assert (ours_draw is None and spec_draw is None) or torch.equal(ours_draw, spec_draw)
    for m in (None, mask):
        torch.testing.assert_close(PENALTIES[regularizer].scalar(None, logits, ours_draw, m),
                                   reference._penalty_scalar(regularizer, None, logits, spec_draw, m),
                                   rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("regularizer", TOKEN_REGULARIZERS)
def test_no_kept_position_gives_a_zero_penalty_even_beside_non_finite_left_out_logits(regularizer):
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[1, 2] = float("nan")  # a left-out position whose logits are not finite stays out
    logits.requires_grad_()
    penalty = PENALTIES[regularizer]
    draw = penalty.sample(logits, torch.Generator().manual_seed(0))
    none_kept = torch.zeros(2, 3, dtype=torch.bool)
    for scalar in (penalty.scalar(None, logits, draw, none_kept),
                   reference._penalty_scalar(regularizer, None, logits, draw, none_kept)):
        grad, = torch.autograd.grad(scalar, logits)
        assert scalar.item() == 0.0 and torch.count_nonzero(grad).item() == 0
    some_kept = none_kept.clone()
    some_kept[0, 1] = True
    grad, = torch.autograd.grad(penalty.scalar(None, logits, draw, some_kept), logits)
    assert torch.isfinite(grad).all() and torch.count_nonzero(grad[1]).item() == 0


def _steps_equal_reference(make_optimizer, regularizer, loss_fn, batch, micro_batch_size, steps=2):
    """``steps`` steps of regopt's optimizer and of regopt.reference from the same TinyLM and generator seed:
    equal losses, penalties and parameters (float64); returns the reference's last stats."""
    model, spec_model = TinyLM(), TinyLM()
    opt = make_optimizer(model.parameters(), generator=torch.Generator().manual_seed(7))
    sgd = torch.optim.SGD(spec_model.parameters(), lr=0.1)
    spec_generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        loss = opt.step(loss_fn(model), batch)
        stats = reference.step(sgd, loss_fn(spec_model), batch, micro_batch_size=micro_batch_size,
                               regularizer=regularizer, penalty=0.5, generator=spec_generator)
        torch.testing.assert_close(loss.item(), stats.loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.stats.penalty.item(), stats.penalty, rtol=1e-10, atol=1e-14)
        assert stats.penalty > 0
    for ours, spec in zip(model.parameters(), spec_model.parameters()):
        torch.testing.assert_close(ours, spec, rtol=1e-10, atol=1e-12)
    return stats


OPTIMIZERS = {
    "fisher_trace": lambda params, **kw: regopt.FisherTraceSGD(params, lr=0.1, micro_batch_size=2, penalty=0.5, **kw),
    "average_jacobian": lambda params, **kw: regopt.JacobianRegSGD(params, lr=0.1, micro_batch_size=2, penalty=0.5,
                                                                   kind="average", **kw),
    "unit_jacobian": lambda params, **kw: regopt.JacobianRegSGD(params, lr=0.1, micro_batch_size=2, penalty=0.5,
                                                                kind="unit", **kw),
}


@pytest.mark.parametrize("regularizer", TOKEN_REGULARIZERS)
@pytest.mark.parametrize("masked", [False, True])
def test_token_level_steps_equal_the_reference(regularizer, masked):
    _steps_equal_reference(OPTIMIZERS[regularizer], regularizer, lambda m: _causal_loss_fn(m, masked), _lm_batch(), 2)


def test_token_level_fisher_trace_with_finite_differences_equals_the_exact_one_closely():
    # The finite-difference path re-evaluates S_j at a shifted θ with the same draw and mask.
    batch = _lm_batch()
    exact, fd = TinyLM(), TinyLM()
    opts = [regopt.FisherTraceSGD(m.parameters(), lr=0.1, micro_batch_size=3, penalty=0.5, method=method,
                                  fd_eps=1e-5, generator=torch.Generator().manual_seed(0))
            for m, method in ((exact, "exact"), (fd, "finite_difference"))]
    for model, opt in zip((exact, fd), opts):
        opt.step(_causal_loss_fn(model, masked=True), batch)
    for a, b in zip(exact.parameters(), fd.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mask_changes_the_penalty_and_all_kept_equals_no_mask():
    batch = _lm_batch()
    penalties_seen = {}
    for name, mask_of in {"none": None, "all": lambda t: torch.ones_like(t, dtype=torch.bool),
                          "labels": lambda t: t != -100}.items():
        model = TinyLM()

        def loss_fn(tokens, labels, model=model, mask_of=mask_of):
            logits, targets = model(tokens)[:, :-1], labels[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
            return (loss, logits) if mask_of is None else (loss, logits, mask_of(targets))
        opt = regopt.FisherTraceSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.5,
                                    generator=torch.Generator().manual_seed(0))
        opt.step(loss_fn, batch)
        penalties_seen[name] = opt.stats.penalty.item()
    assert penalties_seen["all"] == pytest.approx(penalties_seen["none"], rel=1e-12)
    assert penalties_seen["labels"] != penalties_seen["none"]


@pytest.mark.parametrize("regularizer", TOKEN_REGULARIZERS)
def test_micro_batch_without_kept_positions_counts_its_loss_and_no_penalty(regularizer):
    tokens, labels = _lm_batch(size=4, padded=False)
    labels[:2] = -100  # the first micro-batch has no kept position

    def loss_fn(model):
        def per_token_sum(tokens, labels):  # finite without kept positions, unlike a mean over them
            logits, targets = model(tokens)[:, :-1], labels[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                                   ignore_index=-100)
            return loss / targets.numel() + 0.1 * logits.pow(2).mean(), logits, targets != -100
        return per_token_sum
    stats = _steps_equal_reference(OPTIMIZERS[regularizer], regularizer, loss_fn, (tokens, labels), 2)
    assert stats.penalties[0] == 0.0 and stats.penalties[1] > 0 and stats.losses[0] > 0


@pytest.mark.parametrize("bad_mask,match", [
    (lambda t: (t != -100).long(), r"torch\.int64 Tensor of shape \(2, 4\)"),
    (lambda t: t[:, 1:] != -100, r"shape \(2, 3\) .*expected a torch\.bool Tensor of shape \(2, 4\)"),
    (lambda t: [True] * 4, "list"),
])
def test_malformed_masks_are_refused_naming_the_expected_one(bad_mask, match):
    tokens, labels = _lm_batch(size=2)
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    micro = split_batch((tokens, labels), 2)[0]

    def loss_fn(tokens, labels):
        logits = w * torch.zeros(2, 4, 7, dtype=torch.float64)
        return logits.sum(), logits, bad_mask(labels[:, 1:])
    with pytest.raises(TypeError, match=match) as info:
        call_closure(loss_fn, micro, 1)
    assert "micro-batch 0 of 1 (examples 0:2)" in str(info.value)


@pytest.mark.parametrize("logits_shape", [(2, 0, 4), (2, 3, 0), (3, 4, 5)])
def test_logits_with_an_empty_dimension_or_the_wrong_leading_size_are_refused(logits_shape):
    w = torch.ones((), requires_grad=True)
    micro = split_batch(torch.zeros(2, 3), 2)[0]
    with pytest.raises(TypeError, match=r"logits of shape .*\[2, …, C\]"):
        call_closure(lambda x: (w * 1.0, torch.zeros(logits_shape)), micro, 1)


def test_closure_output_carries_the_mask_and_token_logits_unchanged():
    w = torch.ones((), requires_grad=True)
    micro = split_batch(torch.zeros(2, 3), 2)[0]
    logits, mask = torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    out = call_closure(lambda x: (w * 1.0, logits, mask), micro, 1)
    assert out.logits is logits and out.mask is mask
    assert call_closure(lambda x: (w * 1.0, logits, None), micro, 1).mask is None
    assert call_closure(lambda x: (w * 1.0, logits), micro, 1).mask is None
