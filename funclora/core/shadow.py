"""A call's own view of the model: a shallow shadow of the module tree that holds the overlay.

funclora never writes into the user's model, not even for the duration of a call. Each call
builds a *shadow*: for every module that must see other tensors than its own (it owns an
overlay tensor, gets another train/eval flag or another ``forward``), and for each of its
ancestors, a new object of the same class whose ``__dict__`` is a shallow copy of the
original's, with its own ``_parameters`` / ``_buffers`` / ``_modules`` dicts. Weights, hooks,
configs and untouched submodules are shared, never copied (no tensor is copied at all).

The shadow lives as long as something refers to it, so everything that belongs to the call sees
the call's adapter:

- a checkpoint's recompute in backward (``torch.utils.checkpoint``, transformers' gradient
  checkpointing) re-enters the shadow's modules, not the model's;
- ``generate()`` and other multi-forward loops run on the shadow root;
- another thread, another adapter's call, or a plain ``model(x)`` never sees it.

A module that reaches another module through a plain attribute (``self.head = self.layers[-1]``),
a list, tuple or dict of modules, a bound method, or a ``functools.partial`` with modules among
its arguments (accelerate's hooked ``forward``), gets the shadow's counterpart in its shadow. A
reference the shadow cannot redirect (a closure holding a module that must be shadowed, e.g.
``torch.compile``'s wrapper, or a module in a container in a container)
would run the original module with its base weights, silently; :class:`Shadower` refuses it
when the plan is built instead.
"""

from __future__ import annotations

import functools
import types
from types import MethodType
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import AdapterMismatchError, UnsupportedModuleError
from ._kinds import join

__all__ = ["Shadower"]


class _Step(NamedTuple):
    """How to build one module's shadow (steps run parents first)."""

    module: nn.Module
    links: tuple[tuple[int, str], ...]          # (parent step, child name) for each place it sits
    params: tuple[tuple[str, str], ...]         # (leaf, tensor name) set in its ``_parameters``
    buffers: tuple[tuple[str, str], ...]        # (leaf, tensor name) set in its ``_buffers``
    remaps: tuple[tuple[str, object], ...]      # (attribute, value template) pointing at shadowed modules
    forward: str | None                         # key of its replacement ``forward`` in ``forwards``
    view: str | None                            # key of its ``(class, state)`` in ``views``


class Shadower:
    """Builds call-local shadows of ``model`` (see the module docstring).

    Args:
        model: the user's model; read, never written.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> shadow = Shadower(model).build({"0.weight": torch.zeros(2, 2)})
        >>> shadow is model, shadow[0] is model[0], shadow[1] is model[1]   # only what changes is new
        (False, False, True)
        >>> torch.count_nonzero(shadow[0].weight).item(), torch.count_nonzero(model[0].weight).item() > 0
        (0, True)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._recipes: dict[tuple, tuple[tuple[_Step, ...], bool]] = {}  # key -> (steps, needs _finish)
        # the module tree once: unique modules in pre-order, with every (parent, name) they sit under
        self._order: list[nn.Module] = []
        self._paths: dict[int, str] = {}
        self._links: dict[int, list[tuple[int, str]]] = {}
        self._walk(model, "")
        # tensor name -> (module id, "_parameters" / "_buffers", leaf)
        self._slots: dict[str, tuple[int, str, str]] = {}
        for module in self._order:
            path = self._paths[id(module)]
            for kind in ("_parameters", "_buffers"):
                for leaf in getattr(module, kind):
                    self._slots.setdefault(join(path, leaf), (id(module), kind, leaf))
        for name, _ in model.named_parameters(remove_duplicate=False):  # names under a second path
            self._slots.setdefault(name, self._slot_of(name, "_parameters"))
        for name, _ in model.named_buffers(remove_duplicate=False):
            self._slots.setdefault(name, self._slot_of(name, "_buffers"))
        everything = set(self._paths)
        for module in self._order:  # refuse references no shadow could redirect, now rather than mid-call
            self._remaps(module, everything)

    def _walk(self, module: nn.Module, path: str) -> None:
        self._paths[id(module)] = path
        self._links[id(module)] = []
        self._order.append(module)
        for name, child in module._modules.items():
            if child is None:
                continue
            if id(child) not in self._paths:
                self._walk(child, join(path, name))
            self._links[id(child)].append((id(module), name))

    def _slot_of(self, name: str, kind: str) -> tuple[int, str, str]:
        prefix, _, leaf = name.rpartition(".")
        return id(self.model.get_submodule(prefix)), kind, leaf

    def build(self, tensors: dict[str, torch.Tensor], *, training: bool | None = None,
              forwards: dict[str, Callable] | None = None,
              views: dict[str, tuple[type, object]] | None = None) -> nn.Module:
        """A shadow of the model with ``tensors`` in place of its own.

        Args:
            tensors: ``{parameter or buffer name: Tensor}`` (names as ``named_parameters`` /
                ``named_buffers`` give them).
            training: the train/eval flag of every module in the shadow (``None``: the model's own).
            forwards: ``{module path: function(module, *args, **kwargs)}``: bound to that module's
                shadow as its instance ``forward`` (a module with an instance ``forward`` of its own
                keeps it).
            views: ``{module path: (class, state)}``: that module's shadow is an instance of
                ``class`` (a subclass of the module's own) with ``state`` in its ``_view_state``. If
                ``class.wraps_own_forward``, an instance ``forward`` of the module moves to the
                shadow's ``_own_forward`` (for the class's forward to call), else it is kept.

        Returns:
            The shadow root: call it (or its ``generate``) like the model.
        """
        forwards, views = forwards or {}, views or {}
        key = (tuple(tensors), training is not None, tuple(forwards), tuple(views))
        recipe = self._recipes.get(key)
        if recipe is None:
            if len(self._recipes) > 64:  # explicit params dicts of many key sets: keep the cache small
                self._recipes.clear()
            steps = self._recipe(tensors, training is not None, forwards, views)
            late = any(parent >= i for i, step in enumerate(steps) for parent, _ in step.links)
            recipe = self._recipes[key] = steps, late or any(step.remaps for step in steps)
        steps, late = recipe
        if not steps:  # nothing replaced, no flag forced: the model itself is the view
            return self.model
        shadows: list[nn.Module] = []
        for module, links, params, buffers, remaps, forward, view in steps:  # hot path: kept lean
            src = module.__dict__
            d = src.copy()
            if src["_modules"]:  # (empty dicts are shared: nothing is set in them)
                d["_modules"] = src["_modules"].copy()
            if src["_parameters"]:
                d["_parameters"] = p = src["_parameters"].copy()
                for leaf, name in params:
                    p[leaf] = tensors[name]
            if src["_buffers"]:
                d["_buffers"] = b = src["_buffers"].copy()
                for leaf, name in buffers:
                    b[leaf] = tensors[name]
            if training is not None:
                d["training"] = training
            if d.get("_compiled_call_impl") is not None:  # compiled for the original module: it would run that
                d["_compiled_call_impl"] = None
            if view is None:
                shadow = _new(type(module))
            else:
                cls, d["_view_state"] = views[view]
                shadow = _new(cls)
                if "forward" in d and getattr(cls, "wraps_own_forward", False):
                    d["_own_forward"] = d.pop("forward")  # the view's class forward wraps the module's own
            _object_setattr(shadow, "__dict__", d)
            if forward is not None and "forward" not in src:
                d["forward"] = MethodType(forwards[forward], shadow)
            for parent, name in links:
                if parent < len(shadows):
                    shadows[parent].__dict__["_modules"][name] = shadow
            shadows.append(shadow)
        if late:
            self._finish(steps, shadows)
        return shadows[0]

    def _finish(self, steps, shadows) -> None:
        """Links to a parent built later (a module shared under two paths) and redirected attributes."""
        by_id = {id(step.module): shadow for step, shadow in zip(steps, shadows)}
        for shadow, step in zip(shadows, steps):
            for parent, name in step.links:
                shadows[parent].__dict__["_modules"][name] = shadow
            d = shadow.__dict__
            for attr, _ in step.remaps:  # the attribute's value now (the module may have been rewired since)
                if attr == "forward" and "_own_forward" in d:
                    attr = "_own_forward"
                if attr in d and _refers(d[attr], by_id.keys()):
                    d[attr] = _redirect(d[attr], by_id)

    def _recipe(self, tensors, all_modules: bool, forwards, views) -> tuple[_Step, ...]:
        """Which modules get a shadow (changed ones, whoever refers to them, their ancestors), in order."""
        owners: dict[int, tuple[list, list]] = {}
        for name in tensors:
            try:
                mid, kind, leaf = self._slots[name]
            except KeyError:
                raise AdapterMismatchError(
                    f"LoRA.apply: the params dict names {name!r}, which is not a parameter or buffer of the "
                    f"model ({type(self.model).__name__}); pass names as model.named_parameters() gives "
                    "them.") from None
            owners.setdefault(mid, ([], []))[kind == "_buffers"].append((leaf, name))
        forward_of = {id(self.model.get_submodule(path)): path for path in forwards}
        view_of = {id(self.model.get_submodule(path)): path for path in views}
        changed = {id(m) for m in self._order} if all_modules else set(owners) | set(forward_of) | set(view_of)
        chosen = self._close(changed)
        remaps = {mid: self._remaps(module, chosen) for mid, module in
                  ((id(m), m) for m in self._order) if mid in chosen}
        index = {mid: i for i, mid in enumerate(m for m in map(id, self._order) if m in chosen)}
        steps = []
        for module in self._order:
            mid = id(module)
            if mid not in chosen:
                continue
            params, buffers = owners.get(mid, ((), ()))
            links = tuple((index[parent], name) for parent, name in self._links[mid] if parent in index)
            steps.append(_Step(module, links, tuple(params), tuple(buffers), remaps[mid], forward_of.get(mid),
                               view_of.get(mid)))
        return tuple(steps)

    def _close(self, changed: set[int]) -> set[int]:
        """``changed``, every module whose attributes refer to a chosen one, and all their ancestors."""
        chosen: set[int] = set()
        todo = list(changed)
        while todo:
            while todo:
                mid = todo.pop()
                if mid in chosen:
                    continue
                chosen.add(mid)
                todo.extend(parent for parent, _ in self._links[mid])
            for module in self._order:
                if id(module) not in chosen and self._remaps(module, chosen):
                    todo.append(id(module))
        return chosen

    def _remaps(self, module: nn.Module, chosen: set[int]) -> tuple[tuple[str, object], ...]:
        """The attributes of ``module`` (outside ``_modules``) that refer to a module in ``chosen``."""
        out = []
        for attr, value in module.__dict__.items():
            if attr.startswith("_") and attr in _MODULE_INTERNALS:
                continue
            if _refers(value, chosen):
                out.append((attr, value))
            elif _hides(value, chosen):
                path = self._paths[id(module)] or "<root>"
                raise UnsupportedModuleError(
                    f"LoRA: {path!r} ({type(module).__name__}) holds a module of the model inside its attribute "
                    f"{attr!r} (a {type(value).__name__}). funclora runs each call on its own view of the module "
                    "tree and cannot redirect such a reference, so that module would run with its own weights, "
                    "without the adapter. Keep submodules as attributes, in lists, dicts, bound methods or "
                    "partial arguments (not inside a closure, a set, a subclass of list / tuple / dict, or a nested "
                    "container); for torch.compile, pass "
                    "the uncompiled model and compile the LoRA call (torch.compile(lora)) instead.")
        return tuple(out)


_new = object.__new__
_object_setattr = object.__setattr__
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}  # the latter: nulled in build


def _refers(value, chosen) -> bool:
    """Whether ``value`` is a module in ``chosen``, or a list / tuple / dict or bound method that
    reaches one directly (what :func:`_redirect` can point at the shadow)."""
    if isinstance(value, nn.Module):
        return id(value) in chosen
    if type(value) in (list, tuple, dict):
        return any(isinstance(v, nn.Module) and id(v) in chosen for v in _items(value))
    if isinstance(value, types.MethodType):
        return isinstance(value.__self__, nn.Module) and id(value.__self__) in chosen
    if isinstance(value, functools.partial):  # e.g. accelerate's hooked forward: partial(new_forward, module)
        return any(isinstance(v, nn.Module) and id(v) in chosen for v in (*value.args, *value.keywords.values()))
    return False


def _hides(value, chosen: set[int], seen: frozenset = frozenset()) -> bool:
    """Whether ``value`` holds a module in ``chosen`` where no shadow can redirect it: inside a
    partial or a closure, or in a container inside a container."""
    if id(value) in seen:  # closures that refer to each other
        return False
    seen = seen | {id(value)}
    if isinstance(value, functools.partial):
        inner = (value.func, *(v for v in (*value.args, *value.keywords.values()) if not isinstance(v, nn.Module)))
    elif isinstance(value, types.FunctionType) and value.__closure__:
        inner = []
        for cell in value.__closure__:
            try:
                inner.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue
    elif isinstance(value, _CONTAINERS):
        # only plain list / tuple / dict are redirected; a set, an OrderedDict, a namedtuple... hides its modules
        redirected = type(value) in (list, tuple, dict)
        return any((not redirected and isinstance(v, nn.Module) and id(v) in chosen)
                   or ((isinstance(v, _CONTAINERS) or not isinstance(v, nn.Module))
                       and (_refers(v, chosen) or _hides(v, chosen, seen))) for v in _items(value))
    else:
        return False
    return any(_refers(v, chosen) or _hides(v, chosen, seen) for v in inner)


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _items(container):
    return container.values() if isinstance(container, dict) else container


def _redirect(value, by_id: dict[int, nn.Module]):
    """``value`` with each shadowed module replaced by its shadow."""
    if isinstance(value, nn.Module):
        return by_id.get(id(value), value)
    if isinstance(value, types.MethodType):
        return types.MethodType(value.__func__, by_id.get(id(value.__self__), value.__self__))
    if isinstance(value, dict):
        return {k: by_id.get(id(v), v) if isinstance(v, nn.Module) else v for k, v in value.items()}
    if isinstance(value, functools.partial):
        args = (by_id.get(id(v), v) if isinstance(v, nn.Module) else v for v in value.args)
        keywords = {k: by_id.get(id(v), v) if isinstance(v, nn.Module) else v for k, v in value.keywords.items()}
        new = functools.partial(value.func, *args, **keywords)
        new.__dict__.update(value.__dict__)  # functools.update_wrapper's __wrapped__, __name__, ...
        return new
    return type(value)(by_id.get(id(v), v) if isinstance(v, nn.Module) else v for v in value)
