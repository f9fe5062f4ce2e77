"""Multi-process adapter training on ``torch.distributed``: data parallel and FSDP2-sharded bases.

funclora brings no runtime of its own. Launch with ``torchrun``, call
``torch.distributed.init_process_group``, then pick one of:

* **the helper**: every rank holds the frozen base and the same adapter; after the backward
  (or ``torch.func.grad``), :func:`all_reduce_grads` averages the adapter's gradients across
  ranks in one flattened bucket. Only the adapter is communicated.
* **DDP over the façade**: ``DistributedDataParallel(fl.get_peft_model(model, config))``. The
  façade's parameters are the adapter alone (the base model is not a registered submodule), so
  DDP broadcasts and all-reduces exactly the adapter.
* **FSDP2 base**: ``fully_shard`` the base model's blocks and the model; ``lora(adapter, x)``
  then applies the replicated adapter to each unit's all-gathered weights (see
  :func:`sharded_forward`), and :func:`all_reduce_grads` averages the adapter's gradients.

Example (inside a process group):
    >>> import torch, funclora as fl
    >>> from funclora.distributed import all_reduce_grads
    >>> def step(lora, adapter, optimizer, x, y):
    ...     loss = torch.nn.functional.nll_loss(lora(adapter, x), y)
    ...     optimizer.zero_grad()
    ...     loss.backward()
    ...     all_reduce_grads(adapter)     # every rank now holds the mean gradient
    ...     optimizer.step()
    ...     return loss
"""

from __future__ import annotations

import sys
from collections import defaultdict

import optree
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["all_reduce_grads", "broadcast_adapter", "fsdp_units", "sharded_forward"]


# --- gradients and values across ranks ---------------------------------------------------------

def all_reduce_grads(tree, *, group=None):
    """Average an adapter's gradients over the ranks of ``group``, in one flattened bucket.

    ``tree`` is one of:

    * an adapter ``{path: {leaf: Tensor}}`` whose leaves require grad, after ``.backward()``:
      each leaf's ``.grad`` is replaced in place by the mean over ranks (leaves that do not
      require grad are skipped, as DDP skips frozen parameters);
    * a gradient pytree of the same shape, e.g. from ``torch.func.grad`` (no leaf requires
      grad): a new pytree of the means is returned and the input is left alone;
    * an ``nn.Module`` such as the :func:`~funclora.get_peft_model` façade: the ``.grad`` of
      its parameters that require grad, as for an adapter.

    The gradients are concatenated into one bucket per (device, dtype) (normally exactly one),
    summed with one ``all_reduce`` each and divided by the world size. Every rank must call
    this with a tree of the same structure and shapes.

    Args:
        tree: the adapter, a gradient pytree, or a module (see above). Leaves of any shape.
        group: the process group (default: the world).

    Returns:
        The averaged gradients, structured like ``tree`` (for a module: ``{name: grad}``;
        skipped leaves map to ``None``). For parameter trees these are the updated ``.grad``
        tensors themselves.

    Raises:
        RuntimeError: no process group is initialized, or a leaf that requires grad has no
            ``.grad`` (the backward was not run, or this leaf was unused on this rank).

    Example (a one-process group; with two ranks holding ``full((2, 3), r)`` every rank gets
    ``full((2, 3), 0.5)``):
        >>> import torch, torch.distributed as dist
        >>> from funclora.distributed import all_reduce_grads
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> adapter = {"fc": {"lora_A": torch.zeros(2, 3, requires_grad=True)}}
        >>> (3 * adapter["fc"]["lora_A"]).sum().backward()
        >>> all_reduce_grads(adapter)["fc"]["lora_A"].shape      # .grad averaged in place
        torch.Size([2, 3])
        >>> grads = {"fc": {"lora_A": torch.ones(2, 3)}}         # e.g. from torch.func.grad
        >>> all_reduce_grads(grads)["fc"]["lora_A"].sum().item()  # a new pytree
        6.0
        >>> dist.destroy_process_group()
    """
    _require_group("all_reduce_grads", group)
    if isinstance(tree, nn.Module):
        named = {n: p for n, p in tree.named_parameters()}
        return _reduce_param_grads(named, group, lambda n: n)
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
    _check_tensors("all_reduce_grads", leaves)
    if any(t.requires_grad for t in leaves):
        paths = [".".join(map(str, p)) for p in optree.tree_paths(tree, none_is_leaf=False)]
        grads = _reduce_param_grads(dict(zip(paths, leaves)), group, lambda p: p)
        return optree.tree_unflatten(spec, list(grads.values()))
    return optree.tree_unflatten(spec, _mean(leaves, group, copy=True))


def _reduce_param_grads(named: dict, group, label) -> dict:
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    missing = [label(n) for n, p in trainable.items() if p.grad is None]
    if missing:
        raise RuntimeError(
            f"all_reduce_grads: {len(missing)} leaves require grad but have no .grad on rank "
            f"{dist.get_rank(group)}: {missing[:5]}{' ...' if len(missing) > 5 else ''}. Call it after "
            "loss.backward(); a leaf unused on some ranks needs a zero gradient there "
            "(p.grad = torch.zeros_like(p)) so that every rank sends the same bucket.")
    grads = [p.grad for p in trainable.values()]
    _check_tensors("all_reduce_grads", grads, what="gradient")
    means = _mean(grads, group, copy=False)
    out = dict.fromkeys(named)
    for name, mean in zip(trainable, means):
        out[name] = mean
    return out


def _mean(tensors: list[torch.Tensor], group, *, copy: bool) -> list[torch.Tensor]:
    """Mean over ranks of each tensor: one SUM all_reduce per (device, dtype) bucket.

    ``copy=False`` writes the results into ``tensors`` and returns them; ``copy=True`` returns
    views of the reduced bucket and leaves ``tensors`` alone.
    """
    world = dist.get_world_size(group)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(t.device, t.dtype)].append(i)
    for indices in buckets.values():
        members = [tensors[i] for i in indices]
        with torch.no_grad():
            bucket = torch.cat([t.detach().reshape(-1) for t in members])
            dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group)
            bucket.div_(world)
            offset = 0
            for i, t in zip(indices, members):
                view = bucket[offset:offset + t.numel()].view(t.shape)
                offset += t.numel()
                if copy:
                    out[i] = view
                else:
                    t.copy_(view)
                    out[i] = t
    return out


def broadcast_adapter(tree, *, src: int = 0, group=None):
    """Copy rank ``src``'s adapter values into every rank's adapter, in place.

    Use it once before training with the helper when ranks may have initialized differently
    (DDP does the same at construction). Accepts an adapter pytree or a module (its
    parameters). One ``broadcast`` per (device, dtype) bucket.

    Args:
        tree: ``{path: {leaf: Tensor}}`` or an ``nn.Module``; same structure on every rank.
        src: the global rank whose values win.
        group: the process group (default: the world).

    Returns:
        ``tree`` itself, its leaves now equal to rank ``src``'s.
    """
    _require_group("broadcast_adapter", group)
    leaves = list(tree.parameters()) if isinstance(tree, nn.Module) else optree.tree_leaves(tree, none_is_leaf=False)
    _check_tensors("broadcast_adapter", leaves)
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in leaves:
        buckets[(t.device, t.dtype)].append(t)
    with torch.no_grad():
        for members in buckets.values():
            bucket = torch.cat([t.detach().reshape(-1) for t in members])
            dist.broadcast(bucket, src=src, group=group)
            offset = 0
            for t in members:
                t.copy_(bucket[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
    return tree


def _require_group(name: str, group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{name}: no torch.distributed process group is initialized. Launch with torchrun and "
            "call torch.distributed.init_process_group(backend) first (single-process runs need "
            "no gradient averaging: skip this call).")


def _check_tensors(name: str, leaves, what: str = "leaf") -> None:
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: every {what} must be a torch.Tensor, found {type(t).__name__}.")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: {what}s must be dense tensors, found layout {t.layout} (sparse "
                            "embedding gradients cannot share a flat bucket; use sparse=False).")


# --- FSDP2 (fully_shard) bases ------------------------------------------------------------------

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


def sharded_forward(lora, params, adapter, args, kwargs, training, units: dict[str, nn.Module]):
    """The LoRA forward of a model whose parameters FSDP2 shards (called by ``LoRA.__call__``).

    Outside its unit's forward an FSDP2-managed weight is a ``DTensor`` shard; FSDP2's forward
    pre-hook all-gathers it and registers the full weight on the module just before the unit
    runs, which would overwrite an overlay passed to ``functional_call``. So every overlay
    entry owned by a unit is installed by a forward pre-hook that runs right after FSDP2's
    (built from the all-gathered weight, e.g. the lazy ``W (+) s·B@A``), and removed by a
    forward hook after the unit; entries outside any unit go through ``functional_call`` as
    usual. The adapter stays a replicated plain pytree; average its gradients with
    :func:`all_reduce_grads`. Hooks are removed on return, also on exceptions.

    Limits: an explicit ``params`` dict is refused (pass full weights only to ``merge``); an
    adapted module must not contain a separately sharded unit that owns one of its adapted
    weights (shard the block around it instead).
    """
    from .apply import _training_mode

    if params is not None:
        raise NotImplementedError(
            "LoRA.apply: explicit base params are not supported on an FSDP2-sharded model (units "
            f"{sorted(units)[:3]}): its parameters are DTensor shards. Call lora(adapter, x), which "
            "uses each unit's all-gathered weights.")
    model = lora.model
    unit_ids = {id(m) for m in units.values()}

    def unit_of(path: str):
        parts = path.split(".") if path else []
        for k in range(len(parts), -1, -1):
            m = model.get_submodule(".".join(parts[:k]))
            if id(m) in unit_ids:
                return m
        return None

    # unit -> list of (owner path, [(param name relative to owner, value factory)])
    per_unit: dict[int, list] = defaultdict(list)
    unit_by_id: dict[int, nn.Module] = {}
    plain: dict = {}
    with _training_mode(model, training):
        for path, t in lora.plan.targets.items():
            names = lora._updated[path]
            unit = unit_of(t.module_path)
            owners = {n: unit_of(_join(t.module_path, n.rpartition(".")[0])) for n in names}
            if any(o is not unit for o in owners.values()):
                inner = [n for n, o in owners.items() if o is not unit]
                raise NotImplementedError(
                    f"LoRA: {path!r} is adapted but its parameter(s) {inner} belong to a separately "
                    "fully_shard-ed submodule, which is all-gathered only inside that submodule. Apply "
                    f"fully_shard to {t.module_path!r} or a module containing it instead.")
            dropout = t.dropout if t.module.training else 0.0
            if unit is None:
                base = {n: model.get_parameter(_join(t.module_path, n)) for n in names}
                for n, v in t.rule.overlay(t.module, base, adapter[path], t.scaling, dropout=dropout,
                                           path=path).items():
                    plain[_join(t.module_path, n)] = v
                continue
            unit_by_id[id(unit)] = unit
            per_unit[id(unit)].append(("target", t, names, adapter[path], dropout))
        replaced = {f"{p}.{n}": adapter[p][n] for p, ns in lora.plan.saved.items() for n in ns}
        replaced.update({f"{p}.bias": adapter[p]["bias"] for p in lora.plan.biases})
        for name, value in replaced.items():
            unit = unit_of(name.rpartition(".")[0])
            if unit is None:
                plain[name] = value
            else:
                unit_by_id[id(unit)] = unit
                per_unit[id(unit)].append(("replace", name, value))
        if model.training:
            plain.update(lora._buffer_clones())

        installed: dict[int, list] = defaultdict(list)  # unit id -> stack of [(owner, leaf, old, new)]

        def install(unit, args_, kwargs_):
            swaps = []
            for entry in per_unit[id(unit)]:
                if entry[0] == "target":
                    _, t, names, factors, dropout = entry
                    base = {n: _current(model, _join(t.module_path, n)) for n in names}
                    values = t.rule.overlay(t.module, base, factors, t.scaling, dropout=dropout, path=t.path)
                    values = {_join(t.module_path, n): v for n, v in values.items()}
                else:
                    _, name, value = entry
                    _current(model, name)
                    values = {name: value}
                for full, v in values.items():
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
            for uid, unit in unit_by_id.items():
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


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
