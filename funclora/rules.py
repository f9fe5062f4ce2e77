"""Rules: how LoRA attaches to one module type, and the dispatch table that picks them.

A **rule** is a small object that says, for one module type, four things:

1. **which leaves get factors, their shapes and init** — ``factors(module, r)`` returns
   ``{leaf name: Factor(shape, role)}``; the adapter of that module is ``{leaf: Tensor}`` with
   exactly these names and shapes. ``role`` picks PEFT's init (``init_lora_weights=True``):
   ``"A"`` kaiming-uniform (``"gaussian"``: N(0, 1/r)), ``"B"`` zeros, ``"embedding_A"`` zeros,
   ``"embedding_B"`` N(0, 1). Give every A/B pair one ``"A"`` and one ``"B"`` and a fresh adapter
   changes nothing.
2. **which parameters it changes** — ``updated_parameters(module)``: names relative to the
   module (default ``("weight",)``; nested names such as ``"out_proj.weight"`` are fine).
3. **the update** — ``delta(module, factors, scaling)`` returns ``{parameter name: s·ΔW}``, each
   of that parameter's shape. This is what :meth:`funclora.LoRA.merge` adds to the weights.
4. **the forward** (optional) — ``overlay(module, params, factors, scaling, *, dropout, path)``
   returns what the module's forward sees instead of ``params`` (``{name: base tensor}``). The
   default is ``params[name] + delta[name]``, which is right for any module; override it only to
   compute the update factored, e.g. by returning
   ``funclora.lazy.lora_weight(LoraParts(W, A, B, s, "linear"))`` for a weight that the forward
   consumes with ``F.linear`` (the built-in Linear / Conv1D / Embedding / Conv rules do this).
   Whatever it returns must agree with ``delta``: :func:`funclora.testing.check_rule` checks it.

Optional extras: ``check(module, r, path)`` raises :class:`~funclora.UnsupportedModuleError`
for instances the rule cannot handle (say why, and what to do); ``supports_dropout = True`` if
your ``overlay`` applies ``dropout`` (otherwise ``lora_dropout`` is ignored for this module);
``file_key(leaf)`` is the leaf's suffix in PEFT's state-dict file (default: ``lora_A`` →
``lora_A.weight``, ``x.lora_B`` → ``x.lora_B.weight``, other names unchanged).

A rule holds no tensors and no state: it is called with the module (read only, never change
it), the rank ``r``, the factors (plain tensors, possibly with extra leading axes under
``vmap`` — use ``@``, ``reshape`` with ``-1`` or ``...``, and ``transpose(-2, -1)`` rather than
``.T``) and the scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).

Example — LoRA on all four gates of every weight matrix of an ``nn.LSTM`` (all layers, both
directions; ``weight_ih_l{k}`` is ``(4·hidden, in)``, ``weight_hh_l{k}`` ``(4·hidden, hidden)``,
the gates stacked as rows)::

    import torch, funclora as fl
    from torch import nn

    class LSTMRule(fl.Rule):
        # per 2-D weight W (out, in): leaves "<W>.lora_A" (r, in), "<W>.lora_B" (out, r); ΔW = s·B@A
        def updated_parameters(self, module):
            return tuple(n for n, p in module.named_parameters() if p.dim() == 2)

        def factors(self, module, r):
            out = {}
            for name in self.updated_parameters(module):
                rows, cols = module.get_parameter(name).shape
                out[f"{name}.lora_A"] = fl.Factor((r, cols), "A")
                out[f"{name}.lora_B"] = fl.Factor((rows, r), "B")
            return out

        def delta(self, module, factors, scaling):
            return {name: scaling * (factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"])
                    for name in self.updated_parameters(module)}

    model = nn.Sequential(nn.LSTM(8, 16, num_layers=2))
    config = fl.LoraConfig(target_modules=["0"], r=4)
    config.register_custom_module({nn.LSTM: LSTMRule()})   # or fl.register_rule(nn.LSTM, LSTMRule())
    lora = fl.LoRA(model, config)
    lora.shapes()["0"]["weight_ih_l0.lora_A"]               # (4, 8)
    from funclora.testing import check_rule
    check_rule(lambda: nn.LSTM(8, 16, num_layers=2), LSTMRule())   # the laws hold (or it says which not)

The adapter is saved under PEFT-style keys (``base_model.model.0.weight_ih_l0.lora_A.weight``),
so a folder written with this rule loads again once the rule is registered again.

No rule is needed for a single weight: ``target_parameters=["lstm.weight_ih_l0"]`` adapts any
≥2-D parameter with the generic :class:`ParameterRule`.

**Lookup order** (first hit wins): rules given to ``config.register_custom_module`` (checked
with ``isinstance``, in insertion order), then :func:`register_rule` (by MRO), then the built-ins
(by MRO). So a user rule for ``nn.Linear`` replaces the built-in one. Built in: ``nn.Linear``,
``nn.Embedding``, ``nn.Conv1d/2d/3d``, ``nn.MultiheadAttention``, transformers ``Conv1D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .lazy import LoraParts, dense_delta, lora_weight

__all__ = ["Factor", "Rule", "register_rule", "unregister_rule", "find_rule", "ParameterRule",
           "init_factor", "supported_types", "overlay_is_builtin"]


@dataclass(frozen=True)
class Factor:
    """One adapter leaf: its shape and how it is initialised.

    ``role`` is ``"A"`` (kaiming-uniform, or N(0, 1/r) for "gaussian"), ``"B"`` (zeros),
    ``"embedding_A"`` (zeros) or ``"embedding_B"`` (N(0, 1)) — PEFT's init per role.

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
    """Names of the module types that have a rule (built-in and registered).

    Example:
        >>> import funclora as fl
        >>> fl.rules.supported_types()[:3]
        ['torch.nn.Linear', 'torch.nn.Embedding', 'torch.nn.Conv1d']
    """
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
    """Remove a rule added with :func:`register_rule` (built-ins stay).

    Example:
        >>> import funclora as fl, torch.nn as nn
        >>> fl.register_rule(nn.Linear, fl.rules.LinearRule())
        >>> fl.unregister_rule(nn.Linear)
        >>> fl.rules.find_rule(nn.Linear(2, 2))   # the built-in rule again
        LinearRule()
    """
    _USER.pop(module_type, None)


def find_rule(module: nn.Module, custom: dict | None = None) -> Rule | None:
    """The rule for ``module``: config rules, then registered rules, then built-ins; or None.

    Example:
        >>> import torch, funclora as fl
        >>> fl.rules.find_rule(torch.nn.Conv2d(3, 8, 3)), fl.rules.find_rule(torch.nn.LSTM(4, 8))
        (ConvRule(), None)
    """
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
