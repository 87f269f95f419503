"""The base of wrappers (Lookahead, SAM): a ``torch.optim.Optimizer`` around an inner optimizer.

A wrapper changes when and where its inner optimizer steps, not the inner's math, so it
wraps any registered optimizer (built by name) instead of subclassing the step machinery.
It shares the inner optimizer's ``param_groups`` and ``state``: schedulers drive ``lr``
through it, ``state_dict()`` is the inner's (a wrapper keeps its own per-parameter tensors
in the same state, so they are saved with it), ``load_state_dict`` is the inner's checked
one, and hooks, ``zero_grad`` and ``add_param_group`` keep torch.optim's contract.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..registry import Capabilities, Option, get_optimizer_spec
from .base import COMMON_OPTIONS


class Wrapper(torch.optim.Optimizer):
    """A torch.optim.Optimizer that delegates groups, state and the update to ``self.optimizer``."""

    capabilities: ClassVar[Capabilities] = Capabilities(shardable="no")
    common_options: ClassVar[dict[str, Option]] = COMMON_OPTIONS  # passed through to the inner optimizer

    def __init__(self, params: Iterable[Any], inner: str, inner_options: Mapping[str, Any] | None,
                 own: dict[str, Any], **options: Any):
        if not isinstance(inner, str):
            raise ValueError(f"invalid inner: {inner!r} (expected a registered optimizer name, e.g. 'adamw')")
        spec = get_optimizer_spec(inner)
        if inner_options is not None and not isinstance(inner_options, Mapping):
            raise ValueError(f"invalid inner_options: {inner_options!r} (expected a dict of {spec.name}'s options)")
        inner_options = dict(inner_options or {})
        both = [key for key in options if key in inner_options]
        if both:
            raise ValueError(f"option {both[0]!r} is given both flat and in inner_options; give it once")
        self.optimizer: torch.optim.Optimizer = spec.factory(params, **inner_options, **options)
        # torch.optim.Optimizer.__init__ would build its own groups; a wrapper uses the inner's.
        self.defaults = {**self.optimizer.defaults, "inner": spec.name, **own}
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.optimizer.state = state

    @property
    def skipped_steps(self) -> int:
        """Steps the inner optimizer skipped for non-finite gradients (``nonfinite="skip"``)."""
        return getattr(self.optimizer, "skipped_steps", 0)

    def _backend(self, group: Mapping[str, Any]) -> str:
        return self.optimizer._backend(group)

    def __getstate__(self) -> dict[str, Any]:  # deepcopy/pickle keep the inner optimizer
        return dict(self.__dict__)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inner optimizer's checked ``load_state_dict`` (with this wrapper's hooks)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        self.optimizer.load_state_dict(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        own = ", ".join(f"{key}={self.defaults[key]!r}" for key in self.defaults if key not in self.optimizer.defaults)
        return f"{type(self).__name__}({own}) around {self.optimizer!r}"


def inner_options_of(lr: float | None, weight_decay: float | None, options: dict[str, Any]) -> dict[str, Any]:
    """The flat options a wrapper passes to its inner optimizer (lr and weight_decay only when given)."""
    given = {key: value for key, value in (("lr", lr), ("weight_decay", weight_decay)) if value is not None}
    return {**given, **options}
