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
   ``funclora.rules.lora_weight(LoraParts(W, A, B, s, "linear"))`` for a weight that the forward
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

**Lookup order** (first hit wins): rules given to ``config.register_custom_module``, then
:func:`register_rule`, then the built-ins (see :mod:`funclora.core.registry`). Everything below
is importable from here: the base classes, the built-in rules to subclass, the registry
functions, and ``LoraParts`` / ``lora_weight`` / ``dense_delta`` for a factored ``overlay``.
"""

from __future__ import annotations

from .core.lazy import LoraParts, dense_delta, lora_weight
from .core.quantized import OutputRule
from .core.registry import (as_rule, behaves_as_builtin, find_rule, register_rule, supported_types,
                            unregister_rule)
from .core.rules import (Conv1DRule, ConvRule, EmbeddingRule, Factor, LinearRule, MultiheadAttentionRule,
                         ParameterRule, Rule, init_factor, overlay_is_builtin)

__all__ = ["Rule", "Factor", "ParameterRule", "LinearRule", "Conv1DRule", "EmbeddingRule", "ConvRule",
           "MultiheadAttentionRule", "OutputRule", "register_rule", "unregister_rule", "find_rule",
           "supported_types", "as_rule", "behaves_as_builtin", "overlay_is_builtin", "init_factor",
           "LoraParts", "lora_weight", "dense_delta"]
