"""LoRA on an FSDP2-sharded base (``fully_shard``): the overlay goes onto each unit's all-gathered weights.

Outside its unit's forward an FSDP2-managed weight is a ``DTensor`` shard; FSDP2's forward
pre-hook all-gathers it and registers the full weight on the module just before the unit runs,
which would overwrite an overlay passed to ``functional_call``. So every overlay entry owned by
a unit is installed by a forward pre-hook that runs right after FSDP2's (built from the
all-gathered weight, e.g. the lazy ``W (+) s·B@A``), and removed by a forward hook after the
unit; entries outside any unit go through ``functional_call`` as usual. The adapter stays a
replicated plain pytree; average its gradients with :func:`~funclora.distributed.all_reduce_grads`.
Hooks are removed on return, also on exceptions.

This is the one path that writes into the model during a call (FSDP2 itself does, on every
forward): do not share an FSDP2-sharded model between threads.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch import nn

from ..core._kinds import join
from ..core.bound import Adapter, Bound
from ..core.forward import training_mode

__all__ = ["fully_shard_used", "fsdp_units", "sharded_forward"]


@torch.compiler.assume_constant_result  # torch.compile (before 2.12) cannot trace type.__subclasses__
def fully_shard_used() -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to any module in this process (a cheap test).

    ``fully_shard`` gives each module it shards a new class deriving from ``FSDPModule``. While
    torch.compile traces, the answer is taken once, as a constant of the compiled graph.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    return cls is not None and bool(cls.__subclasses__())


def fsdp_units(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of the modules of ``model`` that ``fully_shard`` was applied to.

    Empty when FSDP2 was never imported, so the check costs nothing in single-process use.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if cls is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def sharded_forward(bound: Bound, params, adapter: Adapter, args, kwargs, training, units: dict[str, nn.Module]):
    """The LoRA forward of a model whose parameters FSDP2 shards (called by ``LoRA.run``).

    Limits: an explicit ``params`` dict is refused (pass full weights only to ``merge``); an
    adapted module must not contain a separately sharded unit that owns one of its adapted
    weights (shard the block around it instead).
    """
    if params is not None:
        raise NotImplementedError(
            "LoRA.apply: explicit base params are not supported on an FSDP2-sharded model (units "
            f"{sorted(units)[:3]}): its parameters are DTensor shards. Call lora(adapter, x), which "
            "uses each unit's all-gathered weights.")
    with training_mode(bound.model, training):
        plain, per_unit, unit_by_id = _split_by_unit(bound, adapter, units)
        return _run_with_unit_hooks(bound.model, plain, per_unit, unit_by_id, args, kwargs)


def _split_by_unit(bound: Bound, adapter: Adapter, units: dict[str, nn.Module]):
    """``(plain overlay, {unit id: [entries installed in that unit]}, {unit id: unit})``.

    An entry is ``("target", Target, names, factors, dropout)`` or ``("replace", name, value)``.
    """
    model = bound.model
    unit_ids = {id(m) for m in units.values()}

    def unit_of(path: str):
        parts = path.split(".") if path else []
        for k in range(len(parts), -1, -1):
            m = model.get_submodule(".".join(parts[:k]))
            if id(m) in unit_ids:
                return m
        return None

    per_unit: dict[int, list] = defaultdict(list)
    unit_by_id: dict[int, nn.Module] = {}
    plain: dict = {}
    for path, t in bound.plan.targets.items():
        names = bound.updated[path]
        unit = unit_of(t.module_path)
        inner = [n for n in names if unit_of(join(t.module_path, n.rpartition(".")[0])) is not unit]
        if inner:
            raise NotImplementedError(
                f"LoRA: {path!r} is adapted but its parameter(s) {inner} belong to a separately "
                "fully_shard-ed submodule, which is all-gathered only inside that submodule. Apply "
                f"fully_shard to {t.module_path!r} or a module containing it instead.")
        dropout = t.dropout if t.module.training else 0.0
        if unit is None:
            base = {n: model.get_parameter(join(t.module_path, n)) for n in names}
            for n, v in t.rule.overlay(t.module, base, adapter[path], t.scaling, dropout=dropout, path=path).items():
                plain[join(t.module_path, n)] = v
            continue
        unit_by_id[id(unit)] = unit
        per_unit[id(unit)].append(("target", t, names, adapter[path], dropout))
    for name, value in bound.replaced(adapter).items():
        unit = unit_of(name.rpartition(".")[0])
        if unit is None:
            plain[name] = value
        else:
            unit_by_id[id(unit)] = unit
            per_unit[id(unit)].append(("replace", name, value))
    if model.training:
        plain.update(bound.buffer_clones())
    return plain, per_unit, unit_by_id


def _unit_values(model: nn.Module, entry) -> dict[str, torch.Tensor]:
    """``{full name: tensor}`` an entry installs, built from the unit's all-gathered weights."""
    if entry[0] == "replace":
        _, name, value = entry
        _current(model, name)
        return {name: value}
    _, t, names, factors, dropout = entry
    base = {n: _current(model, join(t.module_path, n)) for n in names}
    values = t.rule.overlay(t.module, base, factors, t.scaling, dropout=dropout, path=t.path)
    return {join(t.module_path, n): v for n, v in values.items()}


def _run_with_unit_hooks(model, plain, per_unit, unit_by_id, args, kwargs):
    """``functional_call(model, plain)`` with each unit's entries installed while the unit runs."""
    installed: dict[int, list] = defaultdict(list)  # unit id -> stack of [(owner, leaf, old, new)]

    def install(unit, args_, kwargs_):
        swaps = []
        for entry in per_unit[id(unit)]:
            for full, v in _unit_values(model, entry).items():
                owner_path, _, leaf = full.rpartition(".")
                owner = model.get_submodule(owner_path)
                swaps.append((owner, leaf, owner._parameters[leaf], v))
                owner._parameters[leaf] = v
        installed[id(unit)].append(swaps)

    def remove(unit, args_, output):
        if installed[id(unit)]:
            _restore(installed[id(unit)].pop())

    handles = []
    try:
        for unit in unit_by_id.values():
            handles.append(unit.register_forward_pre_hook(install, with_kwargs=True))
            handles.append(unit.register_forward_hook(remove, always_call=True))
        return torch.func.functional_call(model, plain, args, kwargs, tie_weights=False, strict=False)
    except RuntimeError as e:
        if "setup_context" in str(e) and "functorch" in str(e):
            raise RuntimeError(
                "LoRA: torch.func transforms (grad, vmap with grad) cannot run through this torch's "
                f"FSDP2 backward hooks (torch {torch.__version__}: its RegisterPostBackwardFunction has "
                "no setup_context; torch 2.14 has one and works). Use loss.backward() and "
                "funclora.distributed.all_reduce_grads(adapter) instead, or a newer torch.") from e
        raise
    finally:
        for h in handles:
            h.remove()
        for stack in installed.values():
            while stack:
                _restore(stack.pop())


def _current(model: nn.Module, name: str) -> torch.Tensor:
    """The weight registered under ``name`` right now (all-gathered inside its unit)."""
    owner_path, _, leaf = name.rpartition(".")
    value = model.get_submodule(owner_path)._parameters[leaf]
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        raise RuntimeError(
            f"LoRA: {name!r} is still a DTensor shard when its FSDP2 unit runs, so it cannot carry "
            "the LoRA update. Apply fully_shard to the module that owns it or to one containing it, "
            "not only to its submodules.")
    return value


def _restore(swaps) -> None:
    for owner, leaf, old, new in reversed(swaps):
        if owner._parameters.get(leaf) is new:
            owner._parameters[leaf] = old
