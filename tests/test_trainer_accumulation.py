"""A trainer's gradient accumulation skips optimizer steps and relies on .grad adding up, which a regopt step does
not read: under Accelerate's gradient_accumulation_steps > 1 the step is refused (regopt's micro-batching is the
accumulation); with 1 it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regopt
from support import assert_same_state, cnn, data_for, logits_closure, snapshot

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton: start and leave it empty."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_gradient_accumulation_is_refused_with_the_fix(fresh_accelerate_state):
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = cnn(3)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    model, prepared = accelerator.prepare(model, opt)
    batches = [data_for(model, 6, seed=t) for t in range(2)]
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=2.*gradient_accumulation_steps=1") as info:
        for batch in batches:
            with accelerator.accumulate(model):
                prepared.step(regopt.BatchClosure(logits_closure(model), batch))
    assert "silently dropped" in str(info.value)
    assert_same_state(before, snapshot(model, opt))


def test_without_accumulation_an_accelerate_step_is_the_plain_step(fresh_accelerate_state):
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=1, cpu=True)
    model, twin = cnn(4), cnn(4)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    twin_opt = regopt.GradNormSGD(twin.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    model, prepared = accelerator.prepare(model, opt)
    batch = data_for(model, 6)
    prepared.step(regopt.BatchClosure(logits_closure(model), batch))
    twin_opt.step(logits_closure(twin), batch)
    assert_same_state(snapshot(model, opt), snapshot(twin, twin_opt))
