import pytest
import torch

from regopt.batching import MicroBatch, batch_size, call_closure, check_micro_batch_size, split_batch


@pytest.mark.parametrize("size,micro,expected", [(10, 3, [3, 3, 3, 1]), (6, 6, [6]), (5, 8, [5]), (1, 1, [1])])
def test_split_sizes_and_weights(size, micro, expected):
    batch = (torch.arange(size), torch.arange(size) * 2)
    parts = split_batch(batch, micro)
    assert [m.size for m in parts] == expected
    assert [m.weight for m in parts] == [n / size for n in expected]
    assert torch.equal(torch.cat([m.data[0] for m in parts]), torch.arange(size))
    assert [m.index for m in parts] == list(range(len(expected)))


def test_split_total_size_overrides_weights():
    assert [m.weight for m in split_batch(torch.zeros(4), 3, total_size=1)] == [3, 1]


def test_split_dict_and_tensor():
    parts = split_batch({"x": torch.arange(5), "y": torch.arange(5)}, 2)
    assert list(parts[0].data) == ["x", "y"] and torch.equal(parts[2].data["y"], torch.tensor([4]))
    assert torch.equal(split_batch(torch.arange(5), 2)[1].data, torch.tensor([2, 3]))


def test_call_closure_conventions():
    w = torch.ones((), requires_grad=True)
    seen = []

    def record(*args, **kwargs):
        seen.append((len(args), sorted(kwargs)))
        return w * 2
    for batch in [torch.zeros(2), (torch.zeros(2), torch.zeros(2)), [torch.zeros(2)], {"a": torch.zeros(2)}]:
        out = call_closure(record, split_batch(batch, 2)[0], 1)
        assert out.logits is None and out.loss.item() == 2
    assert seen == [(1, []), (2, []), (1, []), (0, ["a"])]


def test_call_closure_enables_grad_and_returns_logits():
    w = torch.ones(3, requires_grad=True)
    micro = split_batch(torch.ones(2, 3), 2)[0]
    with torch.no_grad():
        out = call_closure(lambda x: ((x * w).sum(), x * w), micro, 1)
    assert out.loss.requires_grad and out.logits.shape == (2, 3)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_micro_batch_size_must_be_positive_int(value):
    with pytest.raises(ValueError, match="micro_batch_size"):
        check_micro_batch_size(value)


@pytest.mark.parametrize("batch,error,match", [
    (torch.zeros(0, 3), ValueError, "empty"),
    ((), ValueError, "empty"),
    ({}, ValueError, "empty"),
    ((torch.zeros(2), [1, 2]), TypeError, r"batch\[1\] must be a Tensor, got list"),
    ({"x": torch.zeros(3), "y": torch.zeros(2)}, ValueError, r"batch\['x'\]: 3, batch\['y'\]: 2"),
    (torch.tensor(1.0), ValueError, "0-dimensional"),
    (3, TypeError, "batch must be a Tensor"),
])
def test_bad_batches(batch, error, match):
    with pytest.raises(error, match=match):
        batch_size(batch)


def test_bad_closure_results():
    w = torch.ones((), requires_grad=True)
    micro = MicroBatch(0, 0, 2, 1.0, torch.zeros(2))
    cases = [
        (lambda x: 1.0, TypeError, "returned float"),
        (lambda x: w * torch.ones(2), ValueError, r"loss of shape \(2,\)"),
        (lambda x: (w, w, w, w), TypeError, "tuple of length 4"),
        (lambda x: (w, torch.zeros(3, 4)), TypeError, r"logits of shape \(3, 4\)"),
        (lambda x: (w, torch.zeros(2)), TypeError, r"logits of shape \(2,\)"),
        (lambda x: torch.tensor(1.0), ValueError, "does not require grad"),
    ]
    for closure, error, match in cases:
        with pytest.raises(error, match=match) as info:
            call_closure(closure, micro, 1)
        assert "micro-batch 0 of 1 (examples 0:2)" in str(info.value)
