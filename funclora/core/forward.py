"""The forward: the overlay, and how it reaches the modules (never through the user's model).

The forward is::

    overlay = {path.weight: W (+) s·B@A for each target} ∪ {saved-module params} ∪ {trained biases}
    out     = view(*args, **kwargs)     # view: a shallow shadow of the module tree holding the overlay

Each call builds its own view of the module tree (:mod:`funclora.core.shadow`), which shares the
model's tensors and holds the overlay, so other threads, a plain ``model(x)``, and other calls
never see it, while a checkpoint's recompute or a ``generate`` loop that belongs to the call
does. In training mode the view holds copies of the model's buffers, so e.g. BatchNorm running
statistics of the user's model stay as they were. Each target takes one of four paths, sorted
once by :class:`~funclora.core.bound.Bound`:

* ``linear_views``: a targeted ``nn.Linear`` becomes an instance of ``lazy.linear_view``, which
  computes the factored linear without building the lazy weight;
* ``lazy``: other built-in factored targets get a lazy ``LoraWeight`` (:mod:`funclora.core.lazy`);
* ``output_views``: a quantized layer's view adds the branch to its output (QLoRA);
* ``dora``: a DoRA layer's view computes PEFT's DoRA forward (:mod:`funclora.core.dora_forward`),
  with the column norm factored; a layer with a forward of its own gets the merged DoRA weight;
* ``generic``: the rule's own ``overlay``.

While ``torch.compile`` traces, ``torch.func.functional_call`` stands in for the view (the
traced swap is not run by the compiled graph).
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from .bound import Adapter, Bound
from .dora import merged_weight
from .dora_forward import DoraParts
from .lazy import LoraParts, lora_weight

__all__ = ["forward", "bind", "training_mode", "overlay"]


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool | None):
    """Run with every module in ``training`` mode, then restore each module's own flag."""
    if training is None:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def forward(bound: Bound, params, adapter: Adapter, args: tuple, kwargs: dict, training: bool | None):
    """``model(*args, **kwargs)`` with ``adapter`` applied (``adapter`` already checked)."""
    try:
        if torch.compiler.is_compiling():  # traced: functional_call's swap is compiled away
            if training is None:
                return traced_call(bound, params, adapter, args, kwargs)
            with training_mode(bound.model, training):
                return traced_call(bound, params, adapter, args, kwargs)
        return bind(bound, params, adapter, training)(*args, **kwargs)
    except RuntimeError as e:
        if bound.rnn_paths and _NO_RNN_BATCHING.search(str(e)):
            raise _rnn_vmap_error(bound.model, bound.rnn_paths, str(e)) from None
        if bound.output_views and "must override the setup_context" in str(e):
            kinds = sorted({type(bound.plan.targets[p].module).__name__ for p in bound.output_views})
            raise RuntimeError(
                f"LoRA: torch.func transforms (vmap, grad) cannot run through the quantized layers "
                f"{kinds} at {list(bound.output_views)[:3]}: their library's autograd.Function has no "
                "setup_context. Run the adapters one at a time ([lora(fl.select(stacked, i), x) ...]) "
                "or lora.route(stacked, index, x), and train with loss.backward().") from e
        raise


def bind(bound: Bound, params, adapter: Adapter, training: bool | None) -> nn.Module:
    """The call's view of the model, holding the overlay of ``adapter``."""
    views: dict = {}
    replaced = tensors(bound, params, adapter, training, views)
    return bound.shadower.build(replaced, training=training, views=views)


def traced_call(bound: Bound, params, adapter: Adapter, args: tuple, kwargs: dict):
    """The forward while torch.compile traces: ``functional_call`` (its swap is not run, only traced)."""
    replaced = tensors(bound, params, adapter, None)
    return torch.func.functional_call(bound.model, replaced, args, kwargs, tie_weights=False, strict=False)


def tensors(bound: Bound, params, adapter: Adapter, training, views: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the call replaces: the overlay, detached base weights, buffer copies.

    With ``views`` (a dict to fill), targeted ``nn.Linear`` modules get ``{module path:
    (view class, LoraParts)}`` there instead of a lazy weight (see ``lazy.linear_view``).
    """
    if params is not None:
        out = bound.untie(params)
        out.update(overlay(bound, adapter, out, training=training, views=views))
    elif torch.is_grad_enabled():  # base weights read from the model are constants: gradients reach only the adapter
        out = {}
        for name, (owner, leaf) in bound.owners.items():  # cached owners: no module-tree walk per call
            p = owner._parameters.get(leaf)
            if p is not None and p.requires_grad:
                out[name] = p.detach()
        out.update(overlay(bound, adapter, None, detach=True, training=training, views=views))
    else:
        out = overlay(bound, adapter, None, training=training, views=views)
    if bound.model.training if training is None else training:
        out.update(bound.buffer_clones())
    for name in bound.slot_twins:
        out.pop(name, None)
    return out


def overlay(bound: Bound, adapter: Adapter, params, detach: bool = False, training: bool | None = None,
            views: dict | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: what the forward reads instead}`` for every target and replaced tensor."""
    out = {}
    linear_views = bound.linear_views if views is not None else {}
    for path, (name, store, leaf, a, b, scaling, layout, dropout, groups, module) in bound.lazy.items():
        w = store[leaf] if params is None else bound.base(name, params)
        factors = adapter[path]  # the common case, built without the rule's generic dict plumbing
        train = module.training if training is None else training
        parts = LoraParts(w.detach() if detach else w, factors[a], factors[b], scaling, layout,
                          dropout if train else 0.0, path, groups)
        view = linear_views.get(path)
        if view is None:
            out[name] = lora_weight(parts)
        else:
            views[view[0]] = view[1], parts
    for path, (module_path, cls) in bound.output_views.items():
        t = bound.plan.targets[path]
        if views is None:  # torch.compile / an explicit overlay: no view to add the branch in
            t.rule.overlay(t.module, {}, adapter[path], t.scaling, path=path)  # raises, naming the layer
        dropout = t.dropout if (t.module.training if training is None else training) else 0.0
        f = adapter[path]
        if t.dora:
            views[module_path] = cls, DoraParts(None, f["lora_A"], f["lora_B"], f["lora_magnitude_vector"], t.scaling,
                                                "linear", dropout, 1, path)
        else:
            views[module_path] = cls, LoraParts(None, f["lora_A"], f["lora_B"], t.scaling, "linear", dropout, path)
    for path, target in bound.dora.items():
        _dora_overlay(bound, path, target, adapter[path], params, detach, training, views, out)
    for path, t in bound.generic:
        base = {n: bound.base(full, params) for n, full in bound.base_names[path]}
        if detach:
            base = {n: w.detach() for n, w in base.items()}
        dropout = t.dropout if (t.module.training if training is None else training) else 0.0
        for n, v in t.rule.overlay(t.module, base, adapter[path], t.scaling, dropout=dropout, path=path).items():
            out[f"{t.module_path}.{n}"] = v
    for name, path, leaf in bound.replaced_names:  # modules_to_save and trained biases
        out[name] = adapter[path][leaf]
    return out


def _dora_overlay(bound: Bound, path: str, target, factors: dict, params, detach: bool, training, views, out) -> None:
    """A DoRA target's view (``views``), or its merged DoRA weight in ``out`` (no view: compile, a custom forward)."""
    t = bound.plan.targets[path]
    w = target.store[target.leaf] if params is None else bound.base(target.name, params)
    if detach:
        w = w.detach()
    a, b = t.rule.names
    train = t.module.training if training is None else training
    dropout = t.dropout if train else 0.0
    groups = getattr(t.module, "groups", 1)
    if views is not None and target.view is not None:
        views[target.module_path] = target.view, DoraParts(w, factors[a], factors[b], factors["lora_magnitude_vector"],
                                                           t.scaling, target.kind, dropout, groups, path)
        return
    if dropout:
        why = ("torch.compile traces a functional call" if views is None else
               f"its class {type(t.module).__name__} has a forward of its own")
        raise RuntimeError(
            f"LoRA: the DoRA layer {path!r} cannot apply lora_dropout={t.dropout} here: {why}, so funclora can only "
            "give it the merged DoRA weight, and PEFT's DoRA dropout is not a weight. Train it eagerly, with a "
            "built-in layer class, or set lora_dropout=0.")
    out[target.name] = merged_weight(w, factors[a], factors[b], factors["lora_magnitude_vector"], t.scaling,
                                     target.kind, groups=groups)


_NO_RNN_BATCHING = re.compile(r"Batching rule not implemented for (aten::\w*(?:lstm|gru|rnn)\w*)")


def _rnn_vmap_error(model: nn.Module, paths: list[str], message: str) -> RuntimeError:
    """PyTorch's 'Batching rule not implemented for aten::lstm' said in funclora's terms."""
    op = _NO_RNN_BATCHING.search(message).group(1)
    kinds = sorted({type(model.get_submodule(p) if p != "<root>" else model).__name__ for p in paths})
    return RuntimeError(
        f"LoRA: torch.func.vmap cannot run this model: it contains {'/'.join(kinds)} at {paths}, and "
        f"PyTorch has no batching rule for {op} (nn.LSTM / nn.GRU / nn.RNN cannot be vmapped), so "
        "they cannot see a stacked adapter or a vmapped input. Run the adapters one at a time "
        "instead: [lora(fl.select(stacked, i), x) for i in range(n)], or lora.route(stacked, index, x) "
        "for one adapter per example; to batch many sequences, use the RNN's own batch dimension."
    )
