"""Checks that compare two devices or exist on CUDA only: a CUDA float64 step equals the CPU step, and a
step makes one host synchronization whatever the number of micro-batches.

Every test is marked ``cuda`` (``python -m pytest -m cuda``) and skips without CUDA. The device
comes from ``REGOPT_TEST_DEVICE`` (default ``cuda``): ``REGOPT_TEST_DEVICE=cpu`` runs the same
logic on the CPU, where "CUDA equals CPU" becomes "CPU equals CPU" and the host-sync tests
skip, so that the tests themselves are checked on machines without a GPU.

Random penalties (FT, UJ) draw from the optimizer's generator, and a CUDA generator's stream
differs from a CPU generator's, so they are not compared across devices; test_device_paths.py
holds them, and every other check of one device against itself, on each available device.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from support import DETERMINISTIC, assert_models_match, cnn, data_for, every_optimizer, logits_closure, on, stats_vector

DEVICE = torch.device(os.environ.get("REGOPT_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="needs CUDA (REGOPT_TEST_DEVICE=cpu runs these checks on the CPU)"),
]
needs_real_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="host-sync detection exists on CUDA only")


# -- float64: the device's step is the CPU's step ---------------------------------------------------
@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_float64_step_on_device_equals_the_cpu_step(name):
    model, batch = cnn(11), data_for(cnn(11), 7)  # 7 = 3 + 3 + 1: a short tail micro-batch
    runs = []
    for device in (torch.device("cpu"), DEVICE):
        m, b = on(device, model, batch)
        opt = DETERMINISTIC[name](m.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3)
        stats = []
        for _ in range(2):
            opt.step(logits_closure(m), b)
            stats.append(stats_vector(opt))
        runs.append((m, torch.stack(stats)))
    (cpu_model, cpu_stats), (dev_model, dev_stats) = runs
    assert dev_stats.dtype == torch.float64 and next(dev_model.parameters()).device.type == DEVICE.type
    torch.testing.assert_close(dev_stats, cpu_stats, rtol=1e-9, atol=1e-12)
    assert_models_match(dev_model, cpu_model, rtol=1e-9, atol=1e-11)


# -- host synchronization -----------------------------------------------------------------------------
def count_host_syncs(fn) -> list[str]:
    """Run ``fn`` with CUDA's sync debug mode on; returns where each synchronizing call came from.

    Only ``fn``'s own calls are recorded. On torch 2.11 (H200, 2026-11-27) the control below counted a second
    sync at torch/cuda/__init__.py:1270 besides its ``.item()``, while recording also covered the two mode
    switches and nothing synchronized earlier work first; both are now outside the recording. (Not yet
    rerun on a GPU.)"""
    torch.cuda.synchronize()  # work queued by earlier code must not be attributed to fn
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def syncs_per_step(name: str, micro_batches: int) -> list[str]:
    model, batch = on(DEVICE, cnn(19).float(), data_for(cnn(19), 4 * micro_batches))
    batch = (batch[0].float(), batch[1])
    opt = every_optimizer(DEVICE)[name](model.parameters(), lr=0.1, micro_batch_size=4)
    opt.step(logits_closure(model), batch)  # warm-up: lazy initialization may synchronize once
    return count_host_syncs(lambda: opt.step(logits_closure(model), batch))


@needs_real_cuda
def test_the_sync_counter_sees_a_host_sync():  # the control for the two tests below
    syncs = count_host_syncs(lambda: torch.ones(2, device=DEVICE).sum().item())
    assert len(syncs) == 1, syncs
    assert count_host_syncs(lambda: torch.ones(2, device=DEVICE).sum()) == []


@needs_real_cuda
@pytest.mark.parametrize("name", list(every_optimizer(torch.device("cpu"))))
def test_host_syncs_per_step_do_not_grow_with_the_number_of_micro_batches(name):
    few, many = syncs_per_step(name, 2), syncs_per_step(name, 5)
    assert len(few) == len(many), f"2 micro-batches: {few}; 5 micro-batches: {many}"


@needs_real_cuda
@pytest.mark.parametrize("name", list(every_optimizer(torch.device("cpu"))))
def test_a_step_makes_exactly_one_host_sync(name):
    syncs = syncs_per_step(name, 3)
    assert len(syncs) == 1, f"the README promises one host sync per step (the finiteness check); found {syncs}"
