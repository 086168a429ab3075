"""Spawning gloo ranks for the distributed tests: rendezvous, timeouts and failure reports.

``launch(worker, world_size, tmp_dir)`` runs ``worker(rank, world_size)`` on ``world_size``
spawned CPU ranks (gloo on the loopback interface) and returns each rank's result.

Rendezvous. Every launch meets through a ``FileStore`` in its own temporary directory, and
gloo's sockets bind port 0, so no two launches (concurrent pytest sessions included) can
meet on the same port or store.

Timeouts measure a stall, never the total time. The total time is CPU time divided by the
share of the machine the ranks get: on 2 shared cores the two launches took 10-20 s together
on a quiet machine and 258 s next to other CPU jobs (load 24), and most of a rank's 3.3 CPU
seconds is its start (``import torch``: 2.7 s), not the scenarios. A wall-clock budget for a
launch fails under load: with 150 s, a launch took 139 s of it at load 24 and failed its
fixture ("3 ranks did not finish within 150 s") with the ranks held to 5 % of one CPU. A
process-group timeout around ``init_process_group``, which waits for the slowest rank to
start, is the same budget in small: there the ranks' starts drifted 22 s apart, against 30 s.
So:

- every rank waits at a store barrier until all ranks have imported, and only then creates
  the process group, whose connect and collectives time out after ``COLLECTIVE_TIMEOUT_S``:
  that timeout covers how far the ranks drift apart between two collectives (seconds even
  under load), not how long one rank took to start;
- each rank reports its progress (imports done, group up, one line per scenario) in a file,
  and the parent ends the launch when a live rank has reported nothing for
  ``STALL_TIMEOUT_S``: a hang, since a collective stuck on a peer fails after
  ``COLLECTIVE_TIMEOUT_S`` and is reported as that scenario's result;
- any failure (a stall, a rank that raised, crashed or left without its results) raises
  ``LaunchError`` with every rank's progress lines, so a failure under load says where
  each rank was.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
STALL_TIMEOUT_S = 300
POLL_S = 1.0

_progress_file: Any = None  # this rank's progress file, inside a spawned rank


class LaunchError(RuntimeError):
    """The spawned ranks did not all finish and return their results."""


def report(line: str) -> None:
    """Append ``line`` to this rank's progress file (a no-op outside a spawned rank)."""
    if _progress_file is not None:
        _progress_file.write(f"{time.monotonic():.1f} {line}\n")
        _progress_file.flush()


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((name for name in names if name.startswith("lo")), None)


def _paths(out_dir: Path, rank: int) -> tuple[Path, Path]:
    return out_dir / f"rank{rank}.progress", out_dir / f"rank{rank}.pkl"


def _wait_for_every_rank(store: dist.Store, world_size: int) -> None:
    """A barrier on the store: returns once all ``world_size`` ranks have called it."""
    if store.add("ranks_ready", 1) == world_size:
        store.set("all_ready", "1")
    store.wait(["all_ready"])


def _entry(rank: int, world_size: int, worker: Callable[..., dict], out_dir: Path,
           before_init: Callable[[int, int], Any] | None = None) -> None:
    global _progress_file
    progress, result_path = _paths(out_dir, rank)
    _progress_file = open(progress, "a", encoding="utf-8")  # noqa: SIM115  (left open until os._exit)
    report("imported")
    interface = _loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)  # gloo on 127.0.0.1 only
    torch.set_num_threads(1)
    # What the rank does before torch.distributed exists (e.g. build an optimizer), handed to the worker.
    prepared = (before_init(rank, world_size),) if before_init is not None else ()
    store = dist.FileStore(str(out_dir / "store"), world_size)
    store.set_timeout(datetime.timedelta(seconds=STALL_TIMEOUT_S))  # the parent ends a real stall first
    _wait_for_every_rank(store, world_size)
    report("all ranks ready")
    store.set_timeout(datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    report("process group up")
    try:
        result = worker(rank, world_size, *prepared)
    finally:
        dist.destroy_process_group()
    with open(result_path, "wb") as f:
        pickle.dump(result, f)
    report("results written")
    # Leave without running C++ destructors: under load, tearing down gloo/DDP threads at interpreter
    # exit sometimes aborted ("terminate called without an active exception") after the results were written.
    os._exit(0)


def _progress_lines(out_dir: Path, world_size: int) -> str:
    """Each rank's last progress lines (clock: time.monotonic(), shared by the processes of one machine)."""
    lines = []
    for rank in range(world_size):
        path = _paths(out_dir, rank)[0]
        if not path.exists():
            lines.append(f"rank {rank}: no progress yet (still starting: importing torch and the worker)")
            continue
        text = path.read_text(encoding="utf-8").splitlines()
        lines.append(f"rank {rank} ({len(text)} progress lines, the last ones):\n  " + "\n  ".join(text[-5:]))
    return "\n".join(lines)


def _progress_size(out_dir: Path, rank: int) -> int:
    path = _paths(out_dir, rank)[0]
    return path.stat().st_size if path.exists() else 0


def join_ranks(context: Any, out_dir: Path, world_size: int, stall_timeout_s: float = STALL_TIMEOUT_S) -> None:
    """Wait for every rank of ``context`` to exit; raise LaunchError when one fails or stops progressing.

    A rank stalls when it is alive and has not reported progress for ``stall_timeout_s``
    (per rank: a rank stuck outside a collective would otherwise leave the others timing
    out one collective after another, each a scenario error and so progress).
    """
    sizes, changed = [-1] * world_size, [time.monotonic()] * world_size
    while True:
        try:
            if context.join(timeout=min(POLL_S, stall_timeout_s)):
                return
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # a rank raised or crashed
            raise LaunchError(f"a rank failed: {error}\n{_progress_lines(out_dir, world_size)}") from error
        now = time.monotonic()
        for rank in range(world_size):
            size = _progress_size(out_dir, rank)
            if size != sizes[rank]:
                sizes[rank], changed[rank] = size, now
        stalled = [rank for rank in range(world_size)
                   if context.processes[rank].is_alive() and now - changed[rank] > stall_timeout_s]
        if stalled:
            raise LaunchError(f"rank(s) {stalled} reported no progress for {stall_timeout_s} s (a hang; parent clock "
                              f"{now:.1f})\n{_progress_lines(out_dir, world_size)}")


def launch(worker: Callable[..., dict], world_size: int, tmp_dir: Path,
           before_init: Callable[[int, int], Any] | None = None) -> list[dict]:
    """Run ``worker(rank, world_size)`` on ``world_size`` spawned gloo ranks; return each rank's result.

    With ``before_init``, each rank first runs ``prepared = before_init(rank, world_size)`` before
    ``init_process_group``, then ``worker(rank, world_size, prepared)``.
    """
    out_dir = Path(tmp_dir)
    context = mp.start_processes(_entry, args=(world_size, worker, out_dir, before_init), nprocs=world_size,
                                 join=False,
                                 start_method="spawn")
    try:
        join_ranks(context, out_dir, world_size)
    finally:
        for process in context.processes:  # only the processes this call started
            if process.is_alive():
                process.kill()
                process.join()
    results = []
    for rank in range(world_size):
        result_path = _paths(out_dir, rank)[1]
        if not result_path.exists():  # exit status 0 without results: e.g. SIGINT (KeyboardInterrupt) in the rank
            raise LaunchError(f"rank {rank} exited without its results\n{_progress_lines(out_dir, world_size)}")
        with open(result_path, "rb") as f:
            results.append(pickle.load(f))
    return results


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def counting_host_reads(optimizer: Any = None) -> Iterator[list[str]]:
    """Record the function that called each Tensor method copying a value to the host (on CUDA, a
    synchronization), except reads of a generator's state, a host tensor on every device (``state_seed``),
    and, given a regopt ``optimizer``, reads inside its base's own update (torch's Adam reads its step
    counts, which it keeps on the CPU)."""
    reads: list[str] = []
    in_base = [False]
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str, method: Callable) -> Callable:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_name
            if caller != "state_seed" and not in_base[0]:
                reads.append(caller)
            return method(self, *args, **kwargs)
        return wrapper

    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(name, method))
    if optimizer is not None:
        base_step = optimizer._base_step

        def uncounted_base_step() -> None:
            in_base[0] = True
            try:
                base_step()
            finally:
                in_base[0] = False

        optimizer._base_step = uncounted_base_step
    try:
        yield reads
    finally:
        if optimizer is not None:
            del optimizer._base_step
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)

