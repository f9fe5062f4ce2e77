"""The dispatch table: module type (MRO lookup) → :class:`Rule`.

A rule says, for one module type:

* ``factors(module, r)``: which adapter leaves the module gets, their shapes and init role;
* ``delta(module, factors, scaling)``: the dense update of each parameter it changes;
* ``overlay(...)`` (optional): what the forward sees instead of those parameters — by default
  ``W + ΔW``; the built-in Linear / Conv1D / Embedding / Conv rules return a lazy
  :class:`~funclora.lazy.LoraWeight` that computes the update factored.

Lookup order: rules given to ``config.register_custom_module`` (``isinstance``, insertion
order), then :func:`register_rule` (MRO), then the built-ins (MRO). So a user rule for
``nn.Linear`` replaces the built-in one.

Example: a rule that adapts the input-hidden weight of layer 0 of an ``nn.LSTM``::

    class LSTMInputRule(fl.Rule):
        def factors(self, module, r):
            out, inp = module.weight_ih_l0.shape
            return {"lora_A": fl.Factor((r, inp), "A"), "lora_B": fl.Factor((out, r), "B")}

        def updated_parameters(self, module):
            return ("weight_ih_l0",)

        def delta(self, module, factors, scaling):
            return {"weight_ih_l0": scaling * factors["lora_B"] @ factors["lora_A"]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .lazy import LoraParts, dense_delta, lora_weight

__all__ = ["Factor", "Rule", "register_rule", "unregister_rule", "find_rule", "ParameterRule",
           "init_factor", "supported_types"]


@dataclass(frozen=True)
class Factor:
    """One adapter leaf: its shape and how it is initialised.

    ``role`` is ``"A"`` (kaiming-uniform, or N(0, 1/r) for "gaussian"), ``"B"`` (zeros),
    ``"embedding_A"`` (zeros) or ``"embedding_B"`` (N(0, 1)) — PEFT's init per role.
    """

    shape: tuple[int, ...]
    role: str


class Rule:
    """How LoRA attaches to one module type. Override ``factors`` and ``delta``.

    ``updated_parameters`` defaults to ``("weight",)``; override ``overlay`` to compute the
    forward without forming ``ΔW`` (see :mod:`funclora.lazy`).
    """

    #: whether ``lora_dropout`` is applied by this rule's forward
    supports_dropout = False

    def factors(self, module: nn.Module, r: int) -> dict[str, Factor]:
        raise NotImplementedError(f"{type(self).__name__}.factors(module, r) is not implemented")

    def delta(self, module: nn.Module, factors: dict, scaling: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.delta(module, factors, scaling) is not implemented")

    def updated_parameters(self, module: nn.Module) -> tuple[str, ...]:
        """Names (relative to the module) of the parameters this rule changes."""
        return ("weight",)

    def check(self, module: nn.Module, r: int, path: str) -> None:
        """Raise :class:`UnsupportedModuleError` if this module instance cannot take LoRA."""

    def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
        """What the forward uses instead of ``params``: ``{name: W + ΔW}`` by default."""
        return {
            name: params[name] + d.to(params[name].dtype)
            for name, d in self.delta(module, factors, scaling).items()
        }

    def file_key(self, leaf: str) -> str:
        """The PEFT state-dict suffix of an adapter leaf (``lora_A`` → ``lora_A.weight``)."""
        return leaf + ".weight" if leaf.rsplit(".", 1)[-1] in ("lora_A", "lora_B") else leaf

    def __repr__(self):
        return f"{type(self).__name__}()"


class _FactoredRule(Rule):
    """Shared by the rules whose weight becomes a lazy :class:`~funclora.lazy.LoraWeight`."""

    layout = "linear"
    names = ("lora_A", "lora_B")
    supports_dropout = True

    def _parts(self, module, weight, factors, scaling, dropout=0.0, path=""):
        a, b = self.names
        return LoraParts(weight, factors[a], factors[b], scaling, self.layout, dropout, path,
                         getattr(module, "groups", 1))

    def delta(self, module, factors, scaling):
        return {"weight": dense_delta(self._parts(module, module.weight, factors, scaling))}

    def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
        return {"weight": lora_weight(self._parts(module, params["weight"], factors, scaling, dropout, path))}


class LinearRule(_FactoredRule):
    """``nn.Linear(in, out)``: ``lora_A (r, in)``, ``lora_B (out, r)``, ``ΔW = s·B@A``."""

    def factors(self, module, r):
        return {"lora_A": Factor((r, module.in_features), "A"),
                "lora_B": Factor((module.out_features, r), "B")}


class Conv1DRule(_FactoredRule):
    """transformers ``Conv1D`` (weight ``(in, out)``): factors as Linear, ``ΔW = s·(B@A)ᵀ``."""

    layout = "conv1d_t"

    def factors(self, module, r):
        fan_in, fan_out = module.weight.shape
        return {"lora_A": Factor((r, fan_in), "A"), "lora_B": Factor((fan_out, r), "B")}


class EmbeddingRule(_FactoredRule):
    """``nn.Embedding(num, dim)``: ``lora_embedding_A (r, num)``, ``lora_embedding_B (dim, r)``.

    ``ΔW = s·(B@A)ᵀ`` ``(num, dim)``. No dropout (as PEFT).
    """

    layout = "embedding"
    names = ("lora_embedding_A", "lora_embedding_B")
    supports_dropout = False

    def factors(self, module, r):
        return {"lora_embedding_A": Factor((r, module.num_embeddings), "embedding_A"),
                "lora_embedding_B": Factor((module.embedding_dim, r), "embedding_B")}


class ConvRule(_FactoredRule):
    """``nn.Conv1d/2d/3d``: ``lora_A (r, in, *k)``, ``lora_B (out, r/groups, *1)``.

    The forward uses the layer's own stride, padding, dilation, padding_mode and groups.
    ``ΔW[o, i, k…] = s·Σ_ρ B[o, ρ]·A[ρ, i, k…]`` for ``groups == 1``; with ``groups > 1`` the
    update is not a grouped kernel, so the forward is exact but ``merge`` refuses.
    """

    layout = "conv"

    def check(self, module, r, path):
        if r % module.groups:
            raise UnsupportedModuleError(
                f"LoRA: {path!r} is a {type(module).__name__} with groups={module.groups} and the rank "
                f"is {r}; the rank must be divisible by groups. Choose another r (rank_pattern) or "
                "do not target this layer."
            )

    def factors(self, module, r):
        ones = (1,) * len(module.kernel_size)
        return {"lora_A": Factor((r, module.in_channels, *module.kernel_size), "A"),
                "lora_B": Factor((module.out_channels, r // module.groups, *ones), "B")}


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention(E)``: ``in_proj_weight`` and ``out_proj.weight`` both adapted.

    Leaves: ``lora_A (r, E)``, ``lora_B (3E, r)``, ``out_proj.lora_A (r, E)``,
    ``out_proj.lora_B (E, r)``. The out_proj update is applied once (PEFT 0.21 applies it twice).
    """

    def check(self, module, r, path):
        if not module._qkv_same_embed_dim:
            raise UnsupportedModuleError(
                f"LoRA: the nn.MultiheadAttention at {path!r} has kdim/vdim different from embed_dim; "
                "only same embed for query/key/value is supported. Target its parameters instead "
                f"(target_parameters=['{path}.q_proj_weight', ...])."
            )

    def factors(self, module, r):
        e = module.embed_dim
        return {"lora_A": Factor((r, e), "A"), "lora_B": Factor((3 * e, r), "B"),
                "out_proj.lora_A": Factor((r, e), "A"), "out_proj.lora_B": Factor((e, r), "B")}

    def updated_parameters(self, module):
        return ("in_proj_weight", "out_proj.weight")

    def delta(self, module, factors, scaling):
        return {"in_proj_weight": scaling * (factors["lora_B"] @ factors["lora_A"]),
                "out_proj.weight": scaling * (factors["out_proj.lora_B"] @ factors["out_proj.lora_A"])}

    def file_key(self, leaf):
        if leaf.startswith("out_proj."):
            return "base_layer." + super().file_key(leaf)
        return super().file_key(leaf)


class ParameterRule(Rule):
    """Any ≥2-D parameter (``target_parameters``): LSTM/GRU weights, raw ``nn.Parameter`` s.

    * 2-D ``(out, in)``: ``lora_A (r, in)``, ``lora_B (out, r)``, ``ΔW = s·B@A``.
    * 3-D ``(E, d1, d2)`` (a stack of experts, PEFT's layout): ``lora_A (r·E, d2)``,
      ``lora_B (d1, r·E)``; expert ``e`` uses rows ``e·r … e·r+r-1`` of A and columns
      ``e, e+E, e+2E, …`` of B; ``ΔW[e] = s·B_e@A_e``. If the module has ``is_transposed=True``,
      A is ``(r·E, d1)``, B ``(d2, r·E)`` and ``ΔW[e] = s·(B_e@A_e)ᵀ``.
    * ≥4-D ``(out, *rest)``: as 2-D on ``(out, prod(rest))``.
    """

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"ParameterRule({self.name!r})"

    def _shape(self, module):
        return tuple(getattr(module, self.name).shape)

    def check(self, module, r, path):
        if len(self._shape(module)) < 2:
            raise UnsupportedModuleError(
                f"LoRA: target_parameters matched {path!r}, a {len(self._shape(module))}-D parameter; "
                "LoRA needs a parameter with at least 2 dimensions. Remove it from target_parameters."
            )

    def updated_parameters(self, module):
        return (self.name,)

    def factors(self, module, r):
        shape = self._shape(module)
        if len(shape) == 3:
            experts, d1, d2 = shape
            if getattr(module, "is_transposed", False):
                d1, d2 = d2, d1
            return {"lora_A": Factor((r * experts, d2), "A"), "lora_B": Factor((d1, r * experts), "B")}
        return {"lora_A": Factor((r, math.prod(shape[1:])), "A"), "lora_B": Factor((shape[0], r), "B")}

    def delta(self, module, factors, scaling):
        A, B = factors["lora_A"], factors["lora_B"]
        shape = self._shape(module)
        if len(shape) == 3:
            experts = shape[0]
            r = A.shape[-2] // experts
            a = A.reshape(experts, r, A.shape[-1])                       # (E, r, d2)
            b = B.reshape(B.shape[0], r, experts).permute(2, 0, 1)        # (E, d1, r)
            d = scaling * (b @ a)
            if getattr(module, "is_transposed", False):
                d = d.transpose(-2, -1)
            return {self.name: d}
        return {self.name: (scaling * (B @ A)).reshape(shape)}


_BUILTIN: dict = {
    nn.Linear: LinearRule(),
    nn.Embedding: EmbeddingRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.MultiheadAttention: MultiheadAttentionRule(),
    "transformers.pytorch_utils.Conv1D": Conv1DRule(),
}
_USER: dict = {}


def supported_types() -> list[str]:
    """Names of the module types that have a rule (built-in and registered)."""
    names = [f"torch.nn.{t.__name__}" if isinstance(t, type) else t for t in _BUILTIN]
    return names + [f"{t.__module__}.{t.__qualname__}" for t in _USER]


def as_rule(rule, module_type=None) -> Rule:
    """Accept a :class:`Rule` instance or a ``Rule`` subclass (instantiated with no arguments)."""
    if isinstance(rule, type) and issubclass(rule, Rule):
        rule = rule()
    if not isinstance(rule, Rule):
        name = getattr(module_type, "__name__", module_type)
        raise TypeError(
            f"funclora: the rule for {name} must be a funclora.Rule (or a Rule subclass), got "
            f"{rule!r}. PEFT's LoraLayer classes do not apply here; write a Rule with factors() and "
            "delta() (see funclora.rules)."
        )
    return rule


def register_rule(module_type: type, rule) -> None:
    """Use ``rule`` for every module of ``module_type`` (and its subclasses), globally.

    Example:
        >>> import funclora as fl, torch.nn as nn
        >>> class MyLinear(fl.rules.LinearRule): pass
        >>> fl.register_rule(nn.Linear, MyLinear())
        >>> fl.unregister_rule(nn.Linear)
    """
    if not isinstance(module_type, type):
        raise TypeError(f"register_rule: `module_type` must be a class such as nn.LSTM, got {module_type!r}.")
    _USER[module_type] = as_rule(rule, module_type)


def unregister_rule(module_type: type) -> None:
    """Remove a rule added with :func:`register_rule` (built-ins stay)."""
    _USER.pop(module_type, None)


def find_rule(module: nn.Module, custom: dict | None = None) -> Rule | None:
    """The rule for ``module``: config rules, then registered rules, then built-ins; or None."""
    for module_type, rule in (custom or {}).items():
        if isinstance(module, module_type):
            return rule
    mro = type(module).__mro__
    for cls in mro:
        if cls in _USER:
            return _USER[cls]
    for cls in mro:
        rule = _BUILTIN.get(cls) or _BUILTIN.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def init_factor(spec: Factor, r: int, how, generator=None, dtype=torch.float32, device=None) -> torch.Tensor:
    """A new leaf of ``spec.shape`` initialised as PEFT does for ``init_lora_weights=how``."""
    t = torch.empty(spec.shape, dtype=torch.float32, device=device)
    role = spec.role
    if role in ("embedding_A", "embedding_B"):
        if how is False or role == "embedding_B":
            t.normal_(0.0, 1.0, generator=generator)
        else:
            t.zero_()
    elif role == "B" and how is not False:
        t.zero_()
    elif role == "A" and how == "gaussian":
        t.normal_(0.0, 1.0 / r, generator=generator)
    elif role in ("A", "B"):
        nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)
    else:
        raise ValueError(f"funclora: unknown factor role {role!r}; use 'A', 'B', 'embedding_A' or 'embedding_B'.")
    return t.to(dtype)
