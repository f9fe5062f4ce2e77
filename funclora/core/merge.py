"""Merge, unmerge and delta: the adapter folded into (or out of) a params dict, purely.

Tied weights (a language model's input embedding and ``lm_head`` sharing one Parameter) are
treated as PEFT treats them: the base weight is shared, the adapter is not.

- ``merge`` spells out every name of a tied group the adapter touches: the adapted name gets
  ``W + s·ΔW``, its twins keep ``W``. Run the result with ``functional_call(model, merged, x,
  tie_weights=False)``; torch's default ``tie_weights=True`` raises "functional_call got
  multiple values for keys [...], which are tied" instead of silently carrying ``ΔW`` into the
  twin. (PEFT's ``merge_adapter`` writes ``ΔW`` into the shared Parameter, so its tied head
  changes too and its merged model differs from its unmerged one — PEFT warns about this,
  issue #2777. funclora's merged forward equals its unmerged one.)
- ``unmerge`` returns the tied form again: one entry per tied group, under the name
  ``named_parameters()`` uses.

DoRA targets: the update depends on the base weight, ``ΔW = m ⊙ (W + s·BA) / ‖W + s·BA‖ − W``,
so ``merge`` forms it from the weights it merges into, and ``unmerge`` subtracts the update of
the model's own weights (``W`` cannot be recovered from ``W'`` alone: every merged row has norm
``|m_i|``; PEFT caches the norm instead). Grouped-conv DoRA layers cannot be merged (nor in PEFT).
"""

from __future__ import annotations

import torch

from .bound import Adapter, Bound
from .dora import dora_delta

__all__ = ["delta", "merge", "unmerge"]


def delta(bound: Bound, adapter: Adapter, params: dict | None = None) -> dict[str, torch.Tensor]:
    """``{param name: s·ΔW}`` for each adapted weight (see :meth:`funclora.LoRA.delta`); a DoRA
    target's update is formed from its weight in ``params`` (default: the model's)."""
    bound.check(adapter)
    out = {}
    for path, t in bound.plan.targets.items():
        try:
            if path in bound.dora:
                f, target = adapter[path], bound.dora[path]
                a, b = t.rule.names
                w = bound.base(target.name, params)
                out[target.name] = dora_delta(w, f[a], f[b], f["lora_magnitude_vector"], t.scaling,
                                              target.kind, groups=getattr(t.module, "groups", 1))
                continue
            deltas = t.rule.delta(t.module, adapter[path], t.scaling)
        except NotImplementedError as e:
            raise NotImplementedError(f"LoRA.merge: cannot form the update of {path!r}: {e}") from None
        out.update({f"{t.module_path}.{n}": d for n, d in deltas.items()})
    return out


def merge(bound: Bound, adapter: Adapter, params: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """New params ``{name: W + s·ΔW}`` with saved modules and trained biases replaced."""
    base = dict(bound.model.named_parameters()) if params is None else dict(params)
    merged = dict(base)
    deltas, replaced = delta(bound, adapter, base), bound.replaced(adapter)
    for names in bound.tied_groups(list(deltas) + list(replaced)).values():
        for name in names:  # spell out the twins: they keep W (see the module docstring)
            merged.setdefault(name, bound.base(name, base))
    for name, d in deltas.items():
        w = bound.base(name, base)
        merged[name] = (w + d).to(w.dtype)  # one rounding into the base dtype
    merged.update(replaced)
    for twin in bound.slot_twins:  # a module shared under two paths has one slot: name it once
        merged.pop(twin, None)     # (torch's functional_call given both names restores the wrong tensor)
    return merged


def unmerge(bound: Bound, merged: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
    """Undo :func:`merge`: ``W = merged − s·ΔW``; saved modules and biases from the model."""
    params = dict(merged)
    deltas, replaced = delta(bound, adapter), bound.replaced(adapter)
    for name, d in deltas.items():
        w = bound.base(name, merged)
        params[name] = (w - d).to(w.dtype)
    for name in replaced:
        params[name] = bound.model.get_parameter(name)
    for canonical, names in bound.tied_groups(list(deltas) + list(replaced)).items():
        # back to the tied form: one entry, under named_parameters()' name
        present = [n for n in names if n in params]
        value = params[canonical] if canonical in params else params[present[0]]
        for name in names:
            params.pop(name, None)
        params[canonical] = value
    return params
