"""Rules: how LoRA attaches to one module type (the guide for rule authors is :mod:`funclora.rules`).

:class:`Rule` is the interface (factors, updated parameters, delta, optional overlay); the
built-in rules are here: :class:`LinearRule`, :class:`Conv1DRule` (transformers), :class:`EmbeddingRule`,
:class:`ConvRule`, :class:`MultiheadAttentionRule`, and :class:`ParameterRule` for
``target_parameters``. Which rule serves which module type is :mod:`funclora.core.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .lazy import LoraParts, dense_delta, lora_weight

__all__ = ["Factor", "Rule", "ParameterRule", "LinearRule", "Conv1DRule", "EmbeddingRule", "ConvRule",
           "MultiheadAttentionRule", "init_factor", "overlay_is_builtin"]


@dataclass(frozen=True)
class Factor:
    """One adapter leaf: its shape and how it is initialised.

    ``role`` is ``"A"`` (kaiming-uniform, or N(0, 1/r) for "gaussian"), ``"B"`` (zeros),
    ``"embedding_A"`` (zeros) or ``"embedding_B"`` (N(0, 1)) — PEFT's init per role; DoRA's
    ``"magnitude"`` (``lora_magnitude_vector``) is initialised from the base weight, as PEFT does.

    Example:
        >>> import torch, funclora as fl
        >>> fl.rules.find_rule(torch.nn.Linear(4, 3)).factors(torch.nn.Linear(4, 3), 2)
        {'lora_A': Factor(shape=(2, 4), role='A'), 'lora_B': Factor(shape=(3, 2), role='B')}
    """

    shape: tuple[int, ...]
    role: str


class Rule:
    """How LoRA attaches to one module type. Override ``factors`` and ``delta`` (and
    ``updated_parameters`` unless the rule changes ``weight``); the module docstring of
    :mod:`funclora.rules` is the guide, with a complete LSTM example.

    Check a new rule with :func:`funclora.testing.check_rule` before training with it.

    Example — a rule for a module type funclora does not know (``w`` is ``(out, in)``)::

        >>> import torch, funclora as fl
        >>> class Affine(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(3, 4))
        ...     def forward(self, x):
        ...         return x @ self.w.T
        >>> class AffineRule(fl.Rule):
        ...     def updated_parameters(self, module):
        ...         return ("w",)
        ...     def factors(self, module, r):       # lora_A (r, in), lora_B (out, r)
        ...         out, in_ = module.w.shape
        ...         return {"lora_A": fl.Factor((r, in_), "A"), "lora_B": fl.Factor((out, r), "B")}
        ...     def delta(self, module, factors, scaling):
        ...         return {"w": scaling * factors["lora_B"] @ factors["lora_A"]}
        >>> config = fl.LoraConfig(target_modules=["0"], r=2)
        >>> config.register_custom_module({Affine: AffineRule()})
        >>> fl.LoRA(torch.nn.Sequential(Affine()), config).shapes()
        {'0': {'lora_A': (2, 4), 'lora_B': (3, 2)}}
    """

    #: whether ``overlay`` applies ``lora_dropout`` (if False, dropout is ignored for the module)
    supports_dropout = False

    def factors(self, module: nn.Module, r: int) -> dict[str, Factor]:
        """``{leaf name: Factor(shape, role)}``: the adapter leaves of ``module`` at rank ``r``."""
        raise NotImplementedError(f"{type(self).__name__}.factors(module, r) is not implemented")

    def delta(self, module: nn.Module, factors: dict, scaling: float) -> dict[str, torch.Tensor]:
        """``{parameter name: s·ΔW}`` (each of that parameter's shape) from ``factors`` ``{leaf: Tensor}``.

        Raise ``NotImplementedError`` (saying why) if the update has no dense form; then
        ``merge`` refuses this module and the forward must come from ``overlay``.
        """
        raise NotImplementedError(f"{type(self).__name__}.delta(module, factors, scaling) is not implemented")

    def updated_parameters(self, module: nn.Module) -> tuple[str, ...]:
        """Names (relative to the module) of the parameters this rule changes."""
        return ("weight",)

    def check(self, module: nn.Module, r: int, path: str) -> None:
        """Raise :class:`UnsupportedModuleError` if this module instance cannot take LoRA."""

    def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
        """What the forward uses instead of ``params``: ``{name: W + ΔW}`` by default."""
        return {
            name: (params[name] + d).to(params[name].dtype)
            for name, d in self.delta(module, factors, scaling).items()
        }

    def file_key(self, leaf: str) -> str:
        """The PEFT state-dict suffix of an adapter leaf (``lora_A`` → ``lora_A.weight``)."""
        return leaf + ".weight" if leaf.rsplit(".", 1)[-1] in ("lora_A", "lora_B") else leaf

    def __repr__(self):
        return f"{type(self).__name__}()"


class _FactoredRule(Rule):
    """Shared by the rules whose weight becomes a lazy :class:`~funclora.core.lazy.LoraWeight`."""

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

    def delta(self, module, factors, scaling):
        if module.groups != 1:
            raise NotImplementedError(
                f"the {type(module).__name__} has groups={module.groups}: its LoRA update (lora_A a full "
                "conv over all input channels, lora_B grouped, PEFT's layout) mixes channels across "
                "groups, so it is not a grouped kernel and cannot be merged into the weight. The "
                "forward is exact; keep the adapter unmerged, or do not target this layer "
                "(exclude_modules)."
            )
        return super().delta(module, factors, scaling)

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


def overlay_is_builtin(rule: Rule) -> bool:
    """Whether ``rule``'s overlay is funclora's own (it reads the module's weights as dense tensors).

    Example:
        >>> import funclora as fl
        >>> from funclora.rules import LinearRule
        >>> overlay_is_builtin(LinearRule()), overlay_is_builtin(fl.ParameterRule("weight"))
        (True, True)
    """
    return getattr(type(rule).overlay, "__module__", None) == __name__


class ParameterRule(Rule):
    """Any ≥2-D parameter (``target_parameters``): LSTM/GRU weights, raw ``nn.Parameter`` s.

    * 2-D ``(out, in)``: ``lora_A (r, in)``, ``lora_B (out, r)``, ``ΔW = s·B@A``.
    * 3-D ``(E, d1, d2)`` (a stack of experts, PEFT's layout): ``lora_A (r·E, d2)``,
      ``lora_B (d1, r·E)``; expert ``e`` uses rows ``e·r … e·r+r-1`` of A and columns
      ``e, e+E, e+2E, …`` of B; ``ΔW[e] = s·B_e@A_e``. If the module has ``is_transposed=True``,
      A is ``(r·E, d1)``, B ``(d2, r·E)`` and ``ΔW[e] = s·(B_e@A_e)ᵀ``.
    * ≥4-D ``(out, *rest)``: as 2-D on ``(out, prod(rest))`` (a funclora extension: PEFT
      takes 2-D and 3-D parameters only, so PEFT cannot load such an adapter).

    Covers every weight of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (``weight_ih_l1_reverse``,
    ``weight_hr_l0`` with ``proj_size``, ...), ``nn.MultiheadAttention.in_proj_weight`` and raw
    ``nn.Parameter`` s. The forward sees ``W + ΔW``.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.LSTM(4, 6))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["0.weight_hh_l0"], r=2))
        >>> lora.plan.targets["0.weight_hh_l0"].rule
        ParameterRule('weight_hh_l0')
        >>> lora.shapes()["0.weight_hh_l0"]
        {'lora_A': (2, 6), 'lora_B': (24, 2)}
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
