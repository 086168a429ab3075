"""regopt's one global forward pre-hook: calls the active callbacks with every module whose forward starts.

Buffer records (:mod:`regopt.transaction`) and the DistributedDataParallel guard need to see each
module before its forward runs. They share one global ``register_module_forward_pre_hook`` entry,
registered while at least one callback is active, written so that ``torch.compile`` is not hurt:

* The hook's work is excluded from compilation (``torch.compiler.disable``): traced, its body would
  be guarded on, and an in-place ``module.compile()``'d model recompiled at every step.
* Around a ``torch.compile(model)`` wrapper (an ``OptimizedModule``) the hook fires once, for the
  wrapper, and is then taken out until the wrapper's forward returns, so that the compiled graph is
  traced without it (in one piece, not broken at every submodule). Callbacks must therefore handle a
  wrapper for everything it holds (buffer records copy its buffers recursively).

An in-place ``module.compile()``'d module calls the hook from inside its compiled code, which breaks
the graph at every submodule while a callback is active (inside a step): correct, but close to eager
speed. ``torch.compile(model)`` keeps the whole graph.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Callback = Callable[[nn.Module], None]
_COMPILE_HOOK_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"

_callbacks: list[Callback] = []  # active, outermost first
_handle: RemovableHandle | None = None


@contextmanager
def calling(callback: Callback) -> Iterator[None]:
    """Call ``callback(module)`` before the forward of every module that starts inside the block."""
    if _callbacks:  # nested in another callback's block: the hook is in place already
        _callbacks.append(callback)
        try:
            yield
        finally:
            _callbacks.remove(callback)
        return
    with warnings.catch_warnings():
        # PyTorch warns at every call of a torch.compile(model) wrapper while a global hook exists, because
        # the hook fires for the wrapper too: callbacks handle the wrapper for all it holds, as they should.
        warnings.filterwarnings("ignore", message=_COMPILE_HOOK_WARNING)
        _callbacks.append(callback)
        _install()
        try:
            yield
        finally:
            _callbacks.remove(callback)
            _uninstall()


def _before_forward(module: nn.Module, args: object) -> None:
    if torch.compiler.is_compiling():  # traced: leave the graph here and run eagerly (cheaper than always wrapping)
        return _before_forward_eagerly(module, args)
    _call_callbacks(module)


@torch.compiler.disable
def _before_forward_eagerly(module: nn.Module, args: object) -> None:
    _call_callbacks(module)


def _call_callbacks(module: nn.Module) -> None:
    for callback in list(_callbacks):
        callback(module)
    if is_compiled_wrapper(module):
        _uninstall()  # until the wrapper returns: the compiled graph is traced and run without the hook
        resume: list[RemovableHandle] = []

        def reinstall(*_: object) -> None:
            resume.pop().remove()
            if _callbacks and _handle is None:
                _install()

        resume.append(module.register_forward_hook(reinstall, always_call=True))


def is_compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile(model)`` returns."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # none can exist before dynamo is imported
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _install() -> None:
    global _handle
    _handle = nn.modules.module.register_module_forward_pre_hook(_before_forward)


def _uninstall() -> None:
    global _handle
    if _handle is not None:
        _handle.remove()
        _handle = None
