"""Progress displays: one bar per run (serial), or one combined bar for all runs (--jobs N).

A run's loop talks to a :class:`RunProgress` (``update(step, **postfix)``, ``write(message)``,
``close()``); which one depends on where it runs: a tqdm bar of its own, nothing, or (in a
worker process) messages to the parent, which draws every worker's runs in one
:class:`CombinedProgress`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol


class RunProgress(Protocol):
    def update(self, step: int, **postfix: str) -> None: ...

    def write(self, message: str) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """No bar; messages go to stderr."""

    def update(self, step: int, **postfix: str) -> None:
        pass

    def write(self, message: str) -> None:
        print(message, file=sys.stderr)

    def close(self) -> None:
        pass


class RunBar:
    """One run's tqdm bar (the serial display): steps done, and accuracy / loss at each evaluation."""

    def __init__(self, label: str, start: int, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=f"{label:>18}", dynamic_ncols=True, leave=True,
                        file=sys.stderr)

    def update(self, step: int, **postfix: str) -> None:
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


class QueueProgress:
    """A worker's run reporting to the parent through ``queue``: ("progress", index, step, start) at most every
    ``interval`` seconds (and at every evaluation), ("message", text) for messages. ``start``: the step the
    run started from in this invocation (a resumed run's checkpoint step), for the parent's time projections."""

    def __init__(self, queue: Any, index: int, start: int, interval: float = 0.25) -> None:
        self.queue, self.index, self.start, self.interval = queue, index, start, interval
        self._last = 0.0

    def update(self, step: int, **postfix: str) -> None:
        now = time.monotonic()
        if postfix or now - self._last >= self.interval:
            self._last = now
            self.queue.put(("progress", self.index, step, self.start))

    def write(self, message: str) -> None:
        self.queue.put(("message", message))

    def close(self) -> None:
        pass


class CombinedProgress:
    """One bar over the steps of every run still to do; its text names the runs in flight."""

    def __init__(self, total_steps: int, num_runs: int, enabled: bool = True) -> None:
        self.bar = None
        self.num_runs, self.done = num_runs, 0
        self.steps: dict[int, int] = {}
        self.labels: dict[int, tuple[str, int]] = {}
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=self._desc(), unit="step", dynamic_ncols=True, file=sys.stderr)

    def _desc(self) -> str:
        return f"{self.done}/{self.num_runs} runs done"

    def started(self, index: int, label: str, start: int, total: int) -> None:
        self.steps[index], self.labels[index] = start, (label, total)
        self._refresh()

    def advanced(self, index: int, step: int) -> None:
        if index in self.steps and self.bar is not None:
            self.bar.update(max(0, step - self.steps[index]))
        self.steps[index] = max(step, self.steps.get(index, 0))
        self._refresh()

    def finished(self, index: int, message: str) -> None:
        label, total = self.labels.pop(index, ("", 0))
        self.advanced(index, total)
        self.steps.pop(index, None)
        self.done += 1
        self.write(message)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=sys.stderr)

    def _refresh(self) -> None:
        if self.bar is None:
            return
        self.bar.set_description(self._desc(), refresh=False)
        running = ", ".join(f"{label} {self.steps[i]}/{total}" for i, (label, total) in self.labels.items())
        self.bar.set_postfix_str(running, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
