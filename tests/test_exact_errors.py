"""Errors that name the cause: logits that do not require grad (FT), a kernel without a double backward that is
not attention (the op and the modules that run it, and method='finite_difference'), and reentrant checkpointing,
which hides the parameters inside it from torch.autograd.grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import regopt
from regopt import hvp
from support import assert_same_state, cnn, data_for, snapshot


@pytest.mark.parametrize("name", ["FT", "AJ"])
def test_logits_that_do_not_require_grad_are_named_with_the_micro_batch(name):
    model = cnn(3)
    cls = regopt.FisherTraceSGD if name == "FT" else regopt.JacobianRegSGD
    opt = cls(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.3)

    def loss_fn(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits.detach()

    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"logits that do not require grad on micro-batch 0 of 3 \(examples 0:3\)"):
        opt.step(loss_fn, data_for(model, 7))
    assert_same_state(before, snapshot(model, opt))


class _Gate(nn.Module):
    """A squeeze-and-excitation style gate: x · hardsigmoid(W x), as in MobileNetV3."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc(x))


def test_an_op_without_double_backward_is_named_with_its_module_and_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Gate(), nn.Linear(4, 2)).double()
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.3)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError) as info:
        opt.step(lambda a, b: F.cross_entropy(model(a), b), (x, y))
    message = str(info.value)
    assert "the op hardsigmoid" in message and "1.scale_activation (Hardsigmoid)" in message
    assert "method='finite_difference'" in message
    assert "attention" not in message and "TIMM_FUSED_ATTN" not in message  # not an attention model
    assert_same_state(before, snapshot(model, opt))
    fd = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.3, method="finite_difference")
    fd.step(lambda a, b: F.cross_entropy(model(a), b), (x, y))  # the advice works
    assert fd.stats.penalty > 0


def _reentrant_model():
    """The pattern of Hugging Face's enable_input_require_grads: a frozen embedding whose output is made to
    require grad, then a block under reentrant checkpointing."""
    torch.manual_seed(0)
    embedding, block, head = nn.Linear(3, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 4)
    embedding.requires_grad_(False)
    embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    modules = nn.ModuleList([embedding, block, head]).double()

    def loss_fn(x, y):
        return F.cross_entropy(head(checkpoint(block, embedding(x), use_reentrant=True)), y)

    return modules, loss_fn


@pytest.mark.parametrize("name", ["LB", "GN"])
def test_reentrant_checkpointing_that_would_hide_a_block_is_refused_with_the_fix(name):
    modules, loss_fn = _reentrant_model()
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = (regopt.MicroBatchSGD(params, lr=0.1, micro_batch_size=2) if name == "LB"
           else regopt.GradNormSGD(params, lr=0.1, micro_batch_size=2, penalty=0.3))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 4, (4,))
    before = snapshot(modules, opt)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        opt.step(loss_fn, (x, y))
    assert_same_state(before, snapshot(modules, opt))


def test_non_reentrant_checkpointing_updates_the_block():
    modules, _ = _reentrant_model()
    embedding, block, head = modules
    params = [p for p in modules.parameters() if p.requires_grad]
    opt = regopt.GradNormSGD(params, lr=0.1, micro_batch_size=2, penalty=0.3)
    before = [p.detach().clone() for p in block.parameters()]
    opt.step(lambda x, y: F.cross_entropy(head(checkpoint(block, embedding(x), use_reentrant=False)), y),
             (torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 4, (4,))))
    assert all(not torch.equal(a, b) for a, b in zip(before, block.parameters()))



class _SquareOnce(torch.autograd.Function):
    """x², with a backward that autograd cannot differentiate again (a cut in the graph of ∇_θ S_j)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_a_once_differentiable_function_is_refused_not_differentiated_around():
    """Double backprop through a @once_differentiable backward silently drops its terms: the step refuses it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))

    def loss_fn(x, y):
        return torch.nn.functional.cross_entropy(model[1](_SquareOnce.apply(model[0](x))), y)

    exact = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(hvp.NoDoubleBackwardError, match="once_differentiable.*finite_difference"):
        exact.step(loss_fn, (x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and exact.step_count == 0
    fd = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, method="finite_difference")
    fd.step(loss_fn, (x, y))
    assert fd.step_count == 1
