"""copy.deepcopy, pickle and torch.save/torch.load of an optimizer: the copy steps bit for bit like the original
(regopt's settings and generators travel with it, generators by state), as torch.optim optimizers survive it."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import regopt
from support import assert_same_state, cnn, data_for, logits_closure, snapshot
from test_drop_in import ALL, SGD_OPTIONS


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickled, "torch.save": _saved}
NAMES = ["LB", "GN", "FT", "UJ", "GN-fd", "GRAFT-iter"]


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", NAMES)
def test_a_copy_steps_bit_for_bit_like_the_original(name, how):
    model = cnn(3)
    opt = ALL[name](model.parameters(), micro_batch_size=3, max_grad_norm=5.0, **SGD_OPTIONS)
    opt.step(logits_closure(model), data_for(model, 7, seed=0))  # momentum buffers, step count, generator moved
    twin, twin_opt = COPIES[how]((model, opt))
    assert twin_opt.micro_batch_size == 3 and twin_opt.max_grad_norm == 5.0
    for seed in (1, 2):
        batch = data_for(model, 7, seed=seed)
        opt.step(logits_closure(model), batch)
        twin_opt.step(logits_closure(twin), batch)
    assert_same_state(snapshot(model, opt), snapshot(twin, twin_opt))


def test_a_copys_generator_is_its_own():
    model = cnn(4)
    generator = torch.Generator().manual_seed(5)
    opt = regopt.FisherTraceSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.3, generator=generator)
    twin_opt = copy.deepcopy(opt)
    assert twin_opt.generator is not generator and torch.equal(twin_opt.generator.get_state(), generator.get_state())
    opt.step(logits_closure(model), data_for(model, 7))
    assert not torch.equal(twin_opt.generator.get_state(), generator.get_state())


def test_a_copy_keeps_no_hooks_as_torch_optim_copies_keep_none():
    model = cnn(5)
    opt = ALL["GN"](model.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    recorder = regopt.GradNormRecorder(opt)
    twin_opt = copy.deepcopy(opt)
    twin_opt.step(logits_closure(model), data_for(model, 7))
    assert recorder.norms() == [] and not twin_opt._optimizer_step_post_hooks
