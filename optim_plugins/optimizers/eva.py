"""Eva: second-order optimization with Kronecker-vectorized approximation (Zhang, Shi & Li,
ICLR 2023, "Eva: Practical Second-order Optimization with Kronecker-vectorized Approximation";
official code: github.com/lzhangbv/eva, ``kfac/eva.py``).

For a layer with weight gradient G (out x in; a bias is the last column of [W | b], with a
homogeneous 1 appended to the input), Eva keeps two small Kronecker vectors (KVs): the
running averages of the mean input ``a`` and of the mean output gradient ``g`` over the
batch. The curvature is their rank-one Kronecker product, damped: F = (a aᵀ ⊗ g gᵀ) + γ I,
and Sherman-Morrison inverts it in closed form (no matrix inverse)::

    a = (1 - ξ) a + ξ mean(input)          g = (1 - ξ) g + ξ mean(dL/d output)   (ξ = factor_decay)
    V = (G - (gᵀ G a) / ((aᵀa)(gᵀg) + γ) · g aᵀ) / γ      = F⁻¹ vec(G), as a matrix
    ν = min(1, sqrt(κ / Σ_layers lr² <V, G>))             (KL clipping, κ = kl_clip)
    then SGD with momentum (and weight decay) on ν V

Parameters outside a hooked layer take the same SGD step on their raw gradient.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..registry import Capabilities
from .common import check_range
from .sgd import SGD

KV_NAMES = ("eva_a", "eva_g")


def eva_precondition(G: Tensor, a: Tensor, g: Tensor, damping: float) -> Tensor:
    """``(a aᵀ ⊗ g gᵀ + γ I)⁻¹ vec(G)`` as a matrix of G's shape, by Sherman-Morrison (paper, Eq. 9)."""
    coefficient = (g @ G @ a) / ((a @ a) * (g @ g) + damping)
    return (G - coefficient * torch.outer(g, a)) / damping


def supports(module: nn.Module) -> bool:
    """Layers Eva preconditions: ``nn.Linear``, and ``nn.Conv2d`` with groups=1, zero padding, no "same"."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and module.padding != "same")


def input_vector(module: nn.Module, x: Tensor, batch: int | None) -> Tensor:
    """Mean layer input over the (first ``batch``) samples and positions; 1 appended for a bias."""
    if isinstance(module, nn.Conv2d):
        x = x if x.dim() == 4 else x.unsqueeze(0)
        x = x[:batch].mean(0, keepdim=True)  # the patch mean is linear: average the batch first
        padding = 0 if module.padding == "valid" else module.padding
        a = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride).mean(2)[0]
    else:
        x = x[:batch] if x.dim() > 1 else x
        a = x.reshape(-1, x.shape[-1]).mean(0)
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(1)])
    return a


def output_vector(module: nn.Module, grad: Tensor, batch: int | None) -> Tensor:
    """Mean gradient of the layer output over the (first ``batch``) samples and positions."""
    if isinstance(module, nn.Conv2d):
        grad = grad if grad.dim() == 4 else grad.unsqueeze(0)
        return grad[:batch].mean((0, 2, 3))
    grad = grad[:batch] if grad.dim() > 1 else grad
    return grad.reshape(-1, grad.shape[-1]).mean(0)


class _Hook:
    """The forward hook on a layer: calls the optimizer through a weak reference, so that a
    deepcopy or pickle of the model copies a dead hook, not the optimizer and its state."""

    def __init__(self, optimizer: Eva):
        self.optimizer: Callable[[], Eva | None] = weakref.ref(optimizer)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        optimizer = self.optimizer()
        if optimizer is not None:
            optimizer._forward_hook(module, args, kwargs, output)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.optimizer = lambda: None


class Eva(SGD):
    """Eva: SGD with momentum on gradients preconditioned by Kronecker vectors (ICLR 2023).

    Needs the model: ``op.create_optimizer("eva", model, ...)``, ``Eva(model, ...)`` or
    ``Eva(groups, model=model)``. Forward/backward hooks on its ``nn.Linear`` and ``nn.Conv2d``
    layers (whose weight this optimizer holds) record the batch means; ``step()`` folds them
    into the KVs (every ``fac_update_freq`` steps), preconditions, clips and takes the SGD step.
    Other tensors (norms, embeddings, other layers, a layer whose hooks never fired), and
    every tensor when no model is given, take plain SGD (same numbers as ``torch.optim.SGD``).

    What it cannot do: the KVs of a step are the mean over every forward with a backward
    since the last step (gradient accumulation averages micro-batches; the official code
    folds each one into the running average instead). The hooks are not copied: a deepcopy
    or pickle of the optimizer has plain SGD until built again with the model
    (``remove_hooks()`` detaches them). No sharding (the KL clip couples all layers), no
    gradient release, no complex parameters.

    Recommended (the authors' scripts): CIFAR (batch 128) lr 0.1, momentum 0.9, weight_decay
    5e-4, damping 0.03, kl_clip 0.001, factor_decay 0.95, fac_update_freq 1, with 5 warmup
    epochs and step decay; ImageNet ResNet-50: damping 0.002, lr 0.0125 per 32 samples.

    Args:
        lr: learning rate.
        momentum: momentum factor of the SGD step (0 disables the buffer).
        dampening: dampening of the momentum's gradient term.
        weight_decay: weight decay factor (L2: added to the preconditioned gradient, as the official SGD does).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        decoupled_weight_decay: decay the weights directly (p *= 1 - lr * wd).
        damping: γ added to the Kronecker-vectorized curvature (> 0); the preconditioned gradient is about G / γ.
        kl_clip: κ of the KL clipping ν = min(1, sqrt(κ / Σ lr² <V, G>)); 0 or None turns clipping off (the first group's value applies).
        factor_decay: weight ξ of the new batch in the running KVs, a = (1 - ξ) a + ξ new (the official convention).
        fac_update_freq: steps between KV updates (1: every step).
        kfac_batch_size: samples of each batch the KVs are averaged over (the first ones); None: the whole batch.
        model: the model whose Linear/Conv2d layers are preconditioned (None: plain SGD for every tensor).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(elementwise=False, needs_model=True, shardable="no")

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        decoupled_weight_decay: bool = False,
        damping: float = 0.03,
        kl_clip: float | None = 0.001,
        factor_decay: float = 0.95,
        fac_update_freq: int = 1,
        kfac_batch_size: int | None = 16,
        model: nn.Module | None = None,
        **options: Any,
    ):
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError(f"invalid model: {type(model).__name__} differs from the module given as params")
            params, model = params.parameters(), params
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"invalid model: {model!r} (expected a torch.nn.Module or None)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        decoupled_weight_decay=decoupled_weight_decay, damping=damping, kl_clip=kl_clip,
                        factor_decay=factor_decay, fac_update_freq=fac_update_freq, kfac_batch_size=kfac_batch_size)
        super(SGD, self).__init__(params, defaults, **options)
        self._pending: dict[nn.Module, list] = {}  # per layer: [sum of a, sum of g, count] since the last step
        self._layers: list[nn.Module] = []
        self._handles: list[Any] = []
        if model is not None:
            held = {p for group in self.param_groups for p in group["params"]}
            self._layers = [m for m in model.modules() if supports(m) and m.weight in held]
            hook = _Hook(self)
            self._handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self._layers]

    @classmethod
    def model_param_groups(cls, model: nn.Module, options: Mapping[str, Any], **settings: Any) -> tuple[list, dict]:
        """``create_optimizer``'s groups for ``model`` (:func:`optim_plugins.param_groups`), and the model itself."""
        from ..param_groups import param_groups

        if options.get("model") not in (None, model):
            raise ValueError("invalid model: the model option differs from the module given to create_optimizer")
        groups = param_groups(model, weight_decay=options.get("weight_decay"), lr=options.get("lr"), optimizer="eva",
                              **settings)
        return groups, {**options, "model": model}

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("damping", options["damping"], 0.0, low_open=True)
        if options["kl_clip"] is not None:
            check_range("kl_clip", options["kl_clip"], 0.0)
        check_range("factor_decay", options["factor_decay"], 0.0, 1.0, low_open=True)
        for name, allow_none in (("fac_update_freq", False), ("kfac_batch_size", True)):
            value = options[name]
            if not (value is None and allow_none) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"invalid {name}: {value!r} (expected an integer >= 1{' or None' if allow_none else ''})")

    def remove_hooks(self) -> None:
        """Detach the hooks from the model: every tensor takes plain SGD from then on."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._layers, self._pending = [], [], {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also run by load_state_dict: keep the hooks then
        self.__dict__.setdefault("_pending", {})
        self.__dict__.setdefault("_layers", [])
        self.__dict__.setdefault("_handles", [])

    # -------------------------------------------------------------- hooks: the batch means

    def _group_of(self, p: Tensor) -> dict[str, Any] | None:
        """The group holding ``p`` (an index by tensor, rebuilt when a group is added)."""
        count, index = self.__dict__.get("_group_index", (-1, {}))
        if count != len(self.param_groups):
            index = {q: i for i, group in enumerate(self.param_groups) for q in group["params"]}
            self._group_index = (len(self.param_groups), index)
        return self.param_groups[index[p]] if p in index else None

    def _kv_due(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        steps = self.state[p]["step"].item() if "step" in self.state.get(p, {}) else 0
        return int(steps) % group["fac_update_freq"] == 0

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs.get("input")
        if not (torch.is_grad_enabled() and torch.is_tensor(x) and torch.is_tensor(output) and output.requires_grad):
            return
        group = self._group_of(module.weight)
        if group is None or not self._kv_due(module.weight, group):
            return
        batch = group["kfac_batch_size"]
        with torch.no_grad():
            a = input_vector(module, x.detach(), batch).float()

        def record(grad: Tensor) -> None:  # the output's gradient: pairs this forward's a with its g
            with torch.no_grad():
                g = output_vector(module, grad.detach(), batch).float()
                pending = self._pending.get(module)
                if pending is None:
                    self._pending[module] = [a, g, 1]
                else:
                    pending[0], pending[1], pending[2] = pending[0] + a, pending[1] + g, pending[2] + 1

        output.register_hook(record)

    # -------------------------------------------------------------- the step

    def _skip_for_nonfinite(self, work: list) -> bool:
        skipped = super()._skip_for_nonfinite(work)
        if skipped:
            self._pending = {}  # a skipped step leaves no trace, also not in the KVs
        return skipped

    def prepare_step(self, work: list) -> bool:
        """Fold the batch means into the KVs, precondition every hooked layer and clip (replaces its grads in ``work``)."""
        pending, self._pending = self._pending, {}
        where = {p: (group, grads, i) for group, params, grads in work for i, p in enumerate(params)}
        done: list[tuple[list[Tensor], int, Tensor]] = []  # (grads, index, preconditioned) of every hooked tensor
        total = None  # Σ lr² <V, G>
        for module in self._layers:
            if module.weight not in where:
                continue
            group, grads, i = where[module.weight]
            state = self._state_of(module.weight, group)
            if module in pending and int(state["step"].item()) % group["fac_update_freq"] == 0:
                self._fold(state, pending[module], group, module.weight)
            if "eva_a" not in state:
                continue  # no statistics yet (its hooks never fired): plain SGD for this layer
            weight_grad = grads[i]
            dtype = torch.promote_types(weight_grad.dtype, torch.float32)
            G, a = weight_grad.reshape(weight_grad.shape[0], -1).to(dtype), state["eva_a"].to(dtype)
            parts = [(grads, i, G.shape[1], group["lr"])]
            if module.bias is not None and module.bias in where:
                bias_group, bias_grads, j = where[module.bias]
                G = torch.cat([G, bias_grads[j].reshape(-1, 1).to(dtype)], 1)
                parts.append((bias_grads, j, 1, bias_group["lr"]))
            elif module.bias is not None:
                a = a[:-1]  # the bias is not stepped now: precondition the weight alone
            V = eva_precondition(G, a, state["eva_g"].to(dtype), group["damping"])
            start = 0
            for target, index, width, lr in parts:
                v, raw = V[:, start:start + width], G[:, start:start + width]
                term = (v * raw).sum() * lr**2
                total = term if total is None else total + term
                done.append((target, index, v))
                start += width
        kl_clip = self.param_groups[0]["kl_clip"]
        nu = (kl_clip / total.clamp(min=0)).sqrt().clamp(max=1) if total is not None and kl_clip else None
        for target, index, v in done:
            v = v * nu if nu is not None else v
            target[index] = v.reshape(target[index].shape).to(target[index].dtype)
        return True

    def _fold(self, state: dict[str, Any], pending: list, group: Mapping[str, Any], weight: Tensor) -> None:
        """The running KVs (in the state dtype): the first batch's means, then (1 - ξ) kv + ξ new."""
        a_sum, g_sum, count = pending
        decay, dtype = group["factor_decay"], self.state_dtype(weight, group)
        for name, new in zip(KV_NAMES, (a_sum / count, g_sum / count)):
            new = new.to(device=weight.device, dtype=dtype)
            if name in state:
                state[name].mul_(1 - decay).add_(new, alpha=decay)
            else:
                state[name] = new

    # -------------------------------------------------------------- state dicts

    def _check_param_state(self, state: Mapping[str, Any], p: Tensor, wanted: dict[str, Tensor], where: str) -> None:
        """The base's check, plus the KVs of a hooked layer's weight: shapes (in [+1],) and (out,)."""
        module = next((m for m in self._layers if m.weight is p), None)
        if module is not None:
            shapes = dict(zip(KV_NAMES, ((p[0].numel() + (module.bias is not None),), (p.shape[0],))))
            for name, shape in shapes.items():
                if name in state:  # the base then checks the shape and loads in this dtype
                    dtype = state[name].dtype if torch.is_tensor(state[name]) else p.dtype
                    wanted[name] = torch.empty(shape, dtype=dtype, device="meta")
        super()._check_param_state(state, p, wanted, where)


__all__ = ["Eva", "eva_precondition", "input_vector", "output_vector", "supports"]
