"""Bytes per step on the wire and all-reduce time of a distributed step, 2 gloo ranks on 127.0.0.1 (CPU).

    python benchmarks/distributed_comm.py     (from any folder; 2 ranks spawned by tests/dist_support.py)
(1) bytes per step of a real distributed step (dist.all_reduce wrapped to record what it sends):
    LB (MicroBatchSGD) and GN (GradNormSGD) on SmallCNN and ResNet-18 (width 16) of benchmarks/models.py;
(2) the time of one all-reduce of float32 buffers of N+9+T values (G + λP alone) and 2N+9+T (G and P,
    today's penalized wire), median of 30 after 3 warm-ups, for the same N;
(3) a trainer's hook (step(hook, batch=, loss_fn=)): the bytes of a GN step with a no-op hook, its step time
    beside the plain step's (median of 5), and the time of the hook's agreement all-reduce alone (two
    float32 values: whether a rank's hook raised, and which; median of 30 after 3 warm-ups).
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # regopt, benchmarks and the tests' gloo launcher
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_support import launch


def median_ms(fn, repeats, warmups=0):
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmups``, each after a barrier."""
    times = []
    for i in range(warmups + repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= warmups:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def recorded_bytes(step):
    """What each dist.all_reduce received during ``step()``, in bytes."""
    sent = []
    original = dist.all_reduce

    def recording(t, *a, **k):
        sent.append(t.numel() * t.element_size())
        return original(t, *a, **k)
    dist.all_reduce = recording
    try:
        step()
    finally:
        dist.all_reduce = original
    return sent


def hook_cost(label, model, x, y):
    """(3): a GN step with a no-op trainer hook against the plain step, and the agreement all-reduce alone."""
    from regopt import GradNormSGD
    opt = GradNormSGD(model.parameters(), lr=0.01, micro_batch_size=4, penalty=0.1)
    loss_fn = lambda xb, yb: F.cross_entropy(model(xb), yb)  # noqa: E731
    plain, hooked = (lambda: opt.step(loss_fn, (x, y))), (lambda: opt.step(lambda: None, batch=(x, y), loss_fn=loss_fn))
    flags = torch.zeros(2)
    return {f"{label}/GN with hook/bytes": recorded_bytes(hooked),
            f"{label}/GN/step ms (median of 5, beside the hook's)": median_ms(plain, 5),
            f"{label}/GN with hook/step ms (median of 5)": median_ms(hooked, 5),
            f"{label}/hook agreement all-reduce (2 values)/ms": median_ms(lambda: dist.all_reduce(flags), 30, 3)}


def worker(rank, world):
    from benchmarks.models import build_model
    from regopt import GradNormSGD, MicroBatchSGD
    out = {}
    for label_model, name, kwargs in (("small-cnn", "small-cnn", dict(in_channels=1)),
                                      ("resnet18-w16", "resnet18", dict(in_channels=3, width=16)),
                                      ("resnet18-w64", "resnet18", dict(in_channels=3, width=64))):
        torch.manual_seed(0)
        model = build_model(name, **kwargs)
        n = sum(p.numel() for p in model.parameters())
        tensors = len(list(model.parameters()))
        size = 28 if name == "small-cnn" else 32
        x = torch.randn(8, kwargs["in_channels"], size, size)
        y = torch.randint(0, 10, (8,))
        for opt_name, cls, extra in (("LB", MicroBatchSGD, {}), ("GN", GradNormSGD, dict(penalty=0.1)),
                                     ("GN exact_grad_norm=False", GradNormSGD,
                                      dict(penalty=0.1, exact_grad_norm=False))):
            if label_model == "resnet18-w64":
                break  # timing only (a GN step of ResNet-18 on 2 shared cores takes too long)
            opt = cls(model.parameters(), lr=0.01, micro_batch_size=4, **extra)
            step = lambda: opt.step(lambda xb, yb: F.cross_entropy(model(xb), yb), (x, y))  # noqa: E731
            out[f"{label_model}/{opt_name}/bytes"] = recorded_bytes(step)
            out[f"{label_model}/{opt_name}/step ms (median of 5)"] = median_ms(step, 5)
        out[f"{label_model}/params"] = (n, tensors)
        if label_model != "resnet18-w64":
            out.update(hook_cost(label_model, model, x, y))
        for label, numel in (("G+lambdaP (N)", n + 9 + tensors), ("G and P (2N)", 2 * n + 9 + tensors)):
            buf = torch.ones(numel)
            out[f"{label_model}/{label}/ms"] = median_ms(lambda: dist.all_reduce(buf), 30, 3)
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        results = launch(worker, 2, Path(tmp))
    for key, value in results[0].items():
        print(key, value, "| rank 1:", results[1][key])
