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


def _penalties_beside_replayed_draws(optimizer, model, batch, steps, exact_penalty):
    """stats.penalty of ``steps`` steps (lr = 0), and beside each the exact R of the draw the step made.

    ``exact_penalty(generator)`` redraws the step's randomness from a copy of the optimizer's generator (in the
    state the step starts from) with the reference's sampler and returns R for that draw: the paired value.
    """
    values, paired, replay = [], [], torch.Generator()
    for _ in range(steps):
        replay.set_state(optimizer.generator.get_state())
        paired.append(exact_penalty(replay))
        optimizer.step(logits_closure(model), batch)
        values.append(optimizer.stats.penalty.item())
    return torch.tensor(values, dtype=torch.float64), torch.tensor(paired, dtype=torch.float64)


def _assert_unbiased(values, paired, expected):
    """Paired: every step's R is the exact R of its draw (a biased draw or scale fails here, not in the noise);
    then the mean over draws, within 4 standard errors of the exact expectation."""
    torch.testing.assert_close(values, paired, rtol=1e-10, atol=1e-14)
    standard_error = values.std().item() / len(values) ** 0.5
    assert standard_error > 0  # the draws really are made afresh every step
    assert abs(values.mean().item() - expected) < 4 * standard_error


def test_fisher_trace_penalty_expectation_enumerates_all_labels():
    model = mlp(0, width=3, outputs=3)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    params = list(model.parameters())
    logits = model(x)
    probs = torch.softmax(logits, 1).detach()
    expected, exact = 0.0, {}
    for labels in itertools.product(range(3), repeat=2):
        v = torch.autograd.grad(F.cross_entropy(logits, torch.tensor(labels)), params, retain_graph=True)
        exact[labels] = sum((t ** 2).sum() for t in v).item()
        expected += (probs[0, labels[0]] * probs[1, labels[1]]).item() * exact[labels]
    opt = regopt.FisherTraceSGD(params, lr=0.0, micro_batch_size=2, penalty=1.0,
                                generator=torch.Generator().manual_seed(2))
    sampled_probs = torch.softmax(logits.detach().float(), 1)  # FT draws from float32 probabilities

    def exact_penalty(generator):
        return exact[tuple(torch.multinomial(sampled_probs, 1, generator=generator).squeeze(1).tolist())]
    _assert_unbiased(*_penalties_beside_replayed_draws(opt, model, (x, y), 3000, exact_penalty), expected)


def test_unit_jacobian_penalty_expectation_is_frobenius_over_classes():
    model = mlp(1, width=3, outputs=4)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    params = list(model.parameters())
    mean_logits = model(x).mean(0)
    jacobian = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(mean_logits[c], params,
                                                                                  retain_graph=True)])
                            for c in range(4)])  # J, classes × parameters
    gram = jacobian @ jacobian.T  # R(u) = ‖Jᵀu‖² = uᵀ J Jᵀ u
    expected = gram.trace().item() / 4  # E[u uᵀ] = I / C: ‖J‖_F² / C
    opt = regopt.JacobianRegSGD(params, lr=0.0, micro_batch_size=3, penalty=1.0, kind="unit",
                                generator=torch.Generator().manual_seed(3))

    def exact_penalty(generator):
        z = torch.randn(4, generator=generator, dtype=torch.float64)
        u = z / torch.linalg.vector_norm(z)
        return (u @ gram @ u).item()
    _assert_unbiased(*_penalties_beside_replayed_draws(opt, model, (x, y), 3000, exact_penalty), expected)


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
