"""The base optimizer a regopt optimizer wraps: checked once, then sharing its state, and doing the update.

A regopt optimizer computes a gradient (Σ_j w_j ∇[L_j + λR_j], or a grafted one), writes it to ``.grad``
and calls ``base.step()``: the update rule is the base's own (SGD, AdamW, LAMB, ...). The wrapper holds no
copy of the base's state: ``param_groups``, ``state`` and ``defaults`` *are* the base's, so a scheduler or
``add_param_group`` on either one acts on both, and ``state_dict()`` is the base's (plus regopt's entry).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch


def check_base(base: Any) -> None:
    """Refuse a base that cannot update from a ready ``.grad``, with the reason and what to do instead."""
    if isinstance(base, RegoptOptimizer):
        raise TypeError(f"base is already a regopt optimizer ({type(base).__name__}): wrap its base optimizer "
                        f"instead ({type(base).__name__}.base), with the options of both")
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__} "
                        "(e.g. regopt.GradNorm(torch.optim.AdamW(model.parameters(), lr=1e-3), ...))")
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError("SparseAdam updates from sparse gradients only, and regopt's gradient is dense: wrap "
                        "torch.optim.Adam (or SGD, which also takes the sparse gradients of MicroBatch)")
    required = [name for name, p in inspect.signature(base.step).parameters.items()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise TypeError(f"{type(base).__name__}.step needs {', '.join(required)} (it re-evaluates the loss "
                        "itself, as LBFGS does): regopt hands its base a ready gradient in .grad, so it wraps "
                        "optimizers that update from .grad alone (SGD, Adam, AdamW, RMSprop, LAMB, ...)")
    if not any(group["params"] for group in base.param_groups):
        raise ValueError(f"base {type(base).__name__} has no parameters: nothing to optimize")


class RegoptOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are those of ``base``.

    torch.optim.Optimizer's own ``__init__`` is not run (it would copy the groups): the hook tables and the
    step profiling it sets up are set up here; the rest is the base's.
    """

    def _adopt(self, base: torch.optim.Optimizer) -> None:
        check_base(base)
        self.base = base
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()  # step pre/post hooks and profiling, as for any torch.optim optimizer
        self._warned_capturable_if_run_uncaptured = True

    # Properties, not copies: torch.optim.Optimizer.load_state_dict replaces the base's lists and dicts.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, state: Any) -> None:
        self.base.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.base.defaults = defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict()`` (its state holds regopt's entry too), through this optimizer's hooks."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base.state_dict()
        self._save_own_state(state_dict)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's ``load_state_dict``, through this optimizer's hooks."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        self.base.load_state_dict(state_dict)
        self._load_own_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _save_own_state(self, state_dict: dict[str, Any]) -> None:
        """Add to ``state_dict`` what the wrapper keeps outside the base's state (nothing here)."""

    def _load_own_state(self) -> None:
        """Take back, after the base loaded it, what :meth:`_save_own_state` added (nothing here)."""

    def _base_step(self) -> None:
        """The base's update from ``.grad`` (its own step, with its own hooks and any scheduler patched on it)."""
        with torch.no_grad():
            self.base.step()

    def __repr__(self) -> str:
        base = "\n".join("    " + line for line in repr(self.base).splitlines())
        return f"{type(self).__name__}({self._settings_repr()}) around\n{base}"

    def _settings_repr(self) -> str:
        return ""
