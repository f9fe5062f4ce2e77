"""Averaging adapter gradients and broadcasting adapters across ``torch.distributed`` ranks."""

from __future__ import annotations

from collections import defaultdict

import optree
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["all_reduce_grads", "broadcast_adapter"]


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
