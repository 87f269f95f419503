"""Muon: momentum orthogonalised by Newton-Schulz (Jordan et al., 2024, "Muon: An optimizer for
hidden layers in neural networks", https://kellerjordan.github.io/posts/muon/; Liu et al.,
2025, "Muon is Scalable for LLM Training").

For a hidden weight matrix W (2-D; conv filters are flattened to ``(out, -1)``)::

    B = mu B + (1 - mu) g                       (momentum_buffer, an EMA as in the reference)
    U = (1 - mu) g + mu B  if nesterov else B
    O = NS5(U)                                  5 quintic Newton-Schulz steps, (a, b, c) = (3.4445, -4.7750, 2.0315)
    W *= 1 - lr * wd;  W -= lr * scale(A, B) * O

``NS5`` normalises ``U`` by its Frobenius norm and iterates ``X = a X + (b A + c A^2) X``
with ``A = X X^T`` in bfloat16 (as the reference and ``torch.optim.Muon``), giving roughly
``U V^T`` of ``U``'s SVD with singular values in about [0.5, 1.5]. ``scale`` for an A x B
matrix: ``"match_rms_adamw"`` (default, Moonshot's) ``0.2 * sqrt(max(A, B))``, which gives the
update AdamW's RMS so that one lr and weight decay serve Muon and AdamW tensors alike;
``"original"`` (Keller Jordan's) ``sqrt(max(1, A / B))``. Same numbers as
``torch.optim.Muon`` for 2-D tensors with the same ``adjust_lr_fn``.

Everything else (embeddings, output heads, norms, biases, scalars) takes the AdamW update
(``adam``'s update, decoupled weight decay). Which tensors: the group option ``use_muon``
(True / False), or, when it is None, by shape (2-D and more: Muon). Embeddings and heads
are 2-D too: :func:`muon_param_groups` (or ``Muon.from_model``) routes them by module.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import Tensor, nn

from ..registry import Capabilities
from .adam import Adam
from .base import Optimizer
from .common import check_betas, check_choice, check_range

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
HEAD_NAMES = re.compile(r"(?:^|\.)(?:lm_head|head|classifier|output|out_proj_head|fc_out|score)(?:\.|$)")


def newton_schulz(g: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = 5,
                  eps: float = 1e-7) -> Tensor:
    """Orthogonalise the matrix ``g`` (``U S V^T -> ~U V^T``) by the quintic Newton-Schulz iteration, in bf16."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def update_scale(shape: tuple[int, int], adjust_lr_fn: str) -> float:
    """How much a Muon update of an ``A x B`` matrix is scaled (see the module doc)."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    return p.shape[0], p[0].numel() if p.dim() else 1


class Muon(Optimizer):
    """Muon: Newton-Schulz orthogonalised momentum for hidden matrices, AdamW for the rest.

    Recommended: lr 1e-3 to 2e-3 with the default ``match_rms_adamw`` scaling (AdamW's lr and
    weight decay carry over); lr 0.02 with ``"original"`` scaling and a separate AdamW lr
    (``muon_param_groups(model, adamw_lr=3e-4)``). Give embeddings and output heads the
    AdamW path: build groups with :func:`muon_param_groups` / ``Muon.from_model``.

    Args:
        lr: learning rate (both paths).
        momentum: EMA factor of the Muon momentum buffer.
        nesterov: use the Nesterov form (1 - mu) g + mu B of the momentum.
        weight_decay: decoupled weight decay factor (p *= 1 - lr * wd), both paths.
        ns_steps: Newton-Schulz iterations.
        ns_coefficients: (a, b, c) of the quintic Newton-Schulz iteration.
        eps: floor of the norm that U is divided by before Newton-Schulz.
        adjust_lr_fn: update scale of an A x B matrix: "match_rms_adamw" (0.2 sqrt(max(A, B))) or "original" (sqrt(max(1, A/B))).
        adamw_betas: betas of the AdamW path.
        adamw_eps: eps of the AdamW path.
        use_muon: True: Muon, False: AdamW; None: Muon for tensors of 2 or more dimensions.
    """

    capabilities = Capabilities(elementwise=False, shardable="tensors")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr_fn: Literal["match_rms_adamw", "original"] = "match_rms_adamw",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        use_muon: bool | None = None,
        **options: Any,
    ):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, adjust_lr_fn=adjust_lr_fn,
                        adamw_betas=adamw_betas, adamw_eps=adamw_eps, use_muon=use_muon)
        super().__init__(params, defaults, **options)

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, adamw_lr: float | None = None,
                   **options: Any) -> Muon:
        """Muon for ``model`` with :func:`muon_param_groups` (embeddings, heads, norms, biases on AdamW)."""
        groups = muon_param_groups(model, lr=lr, weight_decay=weight_decay, adamw_lr=adamw_lr)
        return cls(groups, lr=lr, weight_decay=weight_decay, **options)

    @classmethod
    def model_param_groups(cls, model: nn.Module, options: Mapping[str, Any], **settings: Any) -> tuple[list, dict]:
        """``create_optimizer``'s groups for ``model``: :func:`muon_param_groups` (embeddings, heads, norms on AdamW)."""
        return muon_param_groups(model, lr=options.get("lr"), weight_decay=options.get("weight_decay"), **settings), dict(options)

    def check_options(self, options: Mapping[str, Any]) -> None:
        super().check_options(options)
        check_range("momentum", options["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", options["weight_decay"], 0.0)
        check_range("eps", options["eps"], 0.0)
        check_range("adamw_eps", options["adamw_eps"], 0.0)
        check_betas(options["adamw_betas"], name="adamw_betas")
        check_choice("adjust_lr_fn", options["adjust_lr_fn"], ("match_rms_adamw", "original"))
        check_choice("use_muon", options["use_muon"], (None, True, False))
        check_choice("nesterov", options["nesterov"], (True, False))
        steps = options["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"invalid ns_steps: {steps!r} (expected an integer in [1, 100))")
        coefficients = options["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"invalid ns_coefficients: {coefficients!r} (expected 3 numbers)")

    def weight_decay_mode(self, group):
        return "decoupled"

    def uses_muon(self, p: Tensor, group: Mapping[str, Any]) -> bool:
        """Whether ``p`` takes the Muon update in ``group``."""
        flag = group["use_muon"]
        return p.dim() >= 2 if flag is None else bool(flag)

    def init_state(self, p, group):
        names = ("momentum_buffer",) if self.uses_muon(p, group) else ("exp_avg", "exp_avg_sq")
        dtype = self.state_dtype(p, group)
        return {name: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) for name in names}

    def update(self, p, g, state, group, step):
        if "momentum_buffer" not in state:  # AdamW path: adam's update (weight decay is already applied)
            adamw = {**group, "betas": group["adamw_betas"], "eps": group["adamw_eps"], "amsgrad": False}
            Adam.update(self, p, g, state, adamw, step)
            return
        if p.dim() < 2:
            raise ValueError(f"Muon needs a matrix; got a tensor of shape {tuple(p.shape)} with use_muon=True")
        momentum, buf = group["momentum"], state["momentum_buffer"]
        buf.lerp_(g, 1 - momentum)
        direction = g.lerp(buf, momentum) if group["nesterov"] else buf
        shape = _matrix_shape(p)
        ortho = newton_schulz(direction.reshape(shape), group["ns_coefficients"], group["ns_steps"], group["eps"])
        p.add_(ortho.reshape(p.shape), alpha=-group["lr"] * update_scale(shape, group["adjust_lr_fn"]))


def is_head(name: str, module: nn.Module, last_linear: nn.Module | None) -> bool:
    """An output head: the model's last ``nn.Linear`` or a module named lm_head / head / classifier / ..."""
    return module is last_linear or bool(HEAD_NAMES.search(name))


def muon_tensor_names(model: nn.Module) -> set[str]:
    """Names of the tensors of ``model`` that take the Muon update: weights of 2 or more
    dimensions that belong to neither an embedding nor an output head (nor a norm)."""
    from ..param_groups import is_embedding_module, is_norm_module

    modules = dict(model.named_modules())
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    embedding_tensors = {id(p) for m in modules.values() if is_embedding_module(m) for p in m.parameters(recurse=False)}
    chosen = set()
    for name, p in model.named_parameters():
        owner_name = name.rpartition(".")[0]
        owner = modules[owner_name]
        if p.dim() < 2 or id(p) in embedding_tensors or is_norm_module(owner) or is_head(owner_name, owner, last_linear):
            continue
        chosen.add(name)
    return chosen


def muon_param_groups(model: nn.Module, lr: float | None = None, weight_decay: float | None = None,
                      adamw_lr: float | None = None, **param_group_options: Any) -> list[dict[str, Any]]:
    """:func:`optim_plugins.param_groups` for Muon, each group split by path and flagged ``use_muon``.

    Hidden matrices (:func:`muon_tensor_names`) get ``use_muon=True``; embeddings, heads, norms,
    biases get ``use_muon=False`` and, when given, ``adamw_lr`` as their lr (a scheduler then
    scales both lrs alike). A group that an override already flags keeps its flag.
    """
    from ..param_groups import param_groups

    groups = param_groups(model, weight_decay=weight_decay, lr=lr, optimizer="muon", **param_group_options)
    hidden = {id(p) for n, p in model.named_parameters() if n in muon_tensor_names(model)}
    split = []
    for group in groups:
        if group.get("use_muon") is not None:
            split.append(group)
            continue
        for flag, label in ((True, "muon"), (False, "adamw")):
            params = [p for p in group["params"] if (id(p) in hidden) == flag]
            if params:
                extra = {} if flag or adamw_lr is None else {"lr": adamw_lr * group.get("lr_scale", 1.0)}
                split.append({**group, "params": params, "name": f"{group['name']}/{label}", "use_muon": flag, **extra})
    return split
