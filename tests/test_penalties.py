"""Monte-Carlo checks of the sampled penalties: the mean of stats.penalty matches the exact expectation."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import regopt
from regopt import penalties
from support import logits_closure, mlp


def _mean_penalty(optimizer, model, batch, steps):
    values = []
    for _ in range(steps):
        optimizer.step(logits_closure(model), batch)
        values.append(optimizer.stats.penalty)
    values = torch.stack(values)
    return values.mean().item(), values.std().item() / steps ** 0.5


def test_fisher_trace_penalty_expectation_enumerates_all_labels():
    model = mlp(0, width=3, outputs=3)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    params = list(model.parameters())
    logits = model(x)
    probs = torch.softmax(logits, 1).detach()
    expected = 0.0
    for labels in itertools.product(range(3), repeat=2):
        labels = torch.tensor(labels)
        v = torch.autograd.grad(F.cross_entropy(logits, labels), params, retain_graph=True)
        expected += probs[0, labels[0]] * probs[1, labels[1]] * sum((t ** 2).sum() for t in v)
    opt = regopt.FisherTraceSGD(params, lr=0.0, micro_batch_size=2, penalty=1.0,
                                generator=torch.Generator().manual_seed(2))
    mean, standard_error = _mean_penalty(opt, model, (x, y), 3000)
    assert abs(mean - expected.item()) < 4 * standard_error
    assert standard_error > 0  # the labels really are drawn afresh every step


def test_unit_jacobian_penalty_expectation_is_frobenius_over_classes():
    model = mlp(1, width=3, outputs=4)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    params = list(model.parameters())
    mean_logits = model(x).mean(0)
    frobenius = sum(sum((t ** 2).sum() for t in torch.autograd.grad(mean_logits[c], params, retain_graph=True))
                    for c in range(4))
    expected = frobenius.item() / 4  # E[u uᵀ] = I / C
    opt = regopt.JacobianRegSGD(params, lr=0.0, micro_batch_size=3, penalty=1.0, kind="unit",
                                generator=torch.Generator().manual_seed(3))
    mean, standard_error = _mean_penalty(opt, model, (x, y), 3000)
    assert abs(mean - expected) < 4 * standard_error and standard_error > 0


def test_average_jacobian_scalar_is_the_all_ones_projection():
    logits = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert penalties.AVERAGE_JACOBIAN.scalar(None, logits, None).item() == (1 + 2 + 3 + 5) / 2


def test_unit_direction_has_unit_norm_and_labels_follow_softmax():
    generator = torch.Generator().manual_seed(0)
    u = penalties.UNIT_JACOBIAN.sample(torch.zeros(5, 7), generator)
    assert u.shape == (7,) and abs(torch.linalg.vector_norm(u).item() - 1) < 1e-6
    logits = torch.tensor([[0.0, 30.0, 0.0]]).repeat(100, 1)  # softmax ≈ one-hot on class 1
    assert torch.equal(penalties.FISHER_TRACE.sample(logits, generator), torch.ones(100, dtype=torch.long))


def test_grad_norm_scalar_is_the_loss_itself():
    loss = torch.tensor(2.0)
    assert penalties.GRAD_NORM.scalar(loss, None, None) is loss


def test_unit_jacobian_direction_is_drawn_and_normalized_in_float32_under_autocast():
    logits = torch.randn(4, 7).to(torch.bfloat16)
    u = penalties.UNIT_JACOBIAN.sample(logits, torch.Generator().manual_seed(3))
    same_draw_in_float32 = penalties.UNIT_JACOBIAN.sample(logits.float(), torch.Generator().manual_seed(3))
    assert u.dtype == torch.float32 and torch.equal(u, same_draw_in_float32)
    assert abs(torch.linalg.vector_norm(u).item() - 1.0) < 1e-6  # bfloat16 normalizes to ~4e-3 only
    scalar = penalties.UNIT_JACOBIAN.scalar(None, logits.requires_grad_(), u)
    assert scalar.dtype == torch.float32
    torch.testing.assert_close(scalar, logits.float().mean(0) @ u)


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), classes=st.integers(1, 12),
       temperature=st.floats(0.1, 10.0))
@settings(max_examples=40, deadline=None)
def test_sample_categorical_draws_exactly_what_torch_multinomial_draws(seed, rows, classes, temperature):
    # FT samples without torch.multinomial's host-synchronizing checks; the labels and the generator's
    # state afterwards must be torch.multinomial's own, so regopt.reference (which calls it) stays the spec.
    probs = torch.softmax(torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * temperature, 1)
    ours, theirs = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    assert torch.equal(penalties.sample_categorical(probs, ours), torch.multinomial(probs, 1, generator=theirs).squeeze(1))
    assert torch.equal(ours.get_state(), theirs.get_state())
