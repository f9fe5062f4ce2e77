"""Pure pytree operations on adapters: stacking for ``vmap``, selecting, unstacking.

An adapter is ``{path: {leaf: Tensor}}``; a *stacked* adapter has the same structure with a
leading axis ``N`` on every leaf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["stack", "unstack", "select"]


def stack(adapters: Sequence[dict]) -> dict:
    """Stack N adapters of one structure into one with a leading axis ``N`` on every leaf.

    Example:
        >>> import torch, funclora as fl
        >>> a = {"fc": {"lora_A": torch.zeros(2, 4), "lora_B": torch.zeros(3, 2)}}
        >>> fl.stack([a, a, a])["fc"]["lora_A"].shape
        torch.Size([3, 2, 4])
    """
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence):
        raise TypeError(f"stack: pass a list of adapters ([a_0, a_1, ...]), got a {type(adapters).__name__}"
                        + (" (one adapter? wrap it: fl.stack([adapter]))." if isinstance(adapters, Mapping) else "."))
    if not adapters:
        raise ValueError("stack: got no adapters; pass a non-empty list.")
    first = checked_leaves(adapters[0], "stack", "adapter 0")
    for i, adapter in enumerate(adapters[1:], 1):
        leaves = checked_leaves(adapter, "stack", f"adapter {i}")
        _same_structure(first, leaves, i)
        for path, names in first.items():
            for leaf, t0 in names.items():
                t1 = leaves[path][leaf]
                if t0.shape != t1.shape:
                    raise ValueError(f"stack: adapter {i}[{path!r}][{leaf!r}] has shape {tuple(t1.shape)}, adapter 0 "
                                     f"has {tuple(t0.shape)}; only adapters of one config stack.")
    return {path: {leaf: torch.stack([a[path][leaf] for a in adapters]) for leaf in names}
            for path, names in first.items()}


def select(stacked: dict, index: int) -> dict:
    """Adapter ``index`` of a stacked adapter (leaves are views): each leaf ``(N, *shape)`` → ``shape``.

    Example:
        >>> import torch, funclora as fl
        >>> a = {"fc": {"lora_A": torch.zeros(2, 4), "lora_B": torch.ones(3, 2)}}
        >>> stacked = fl.stack([a, a, a])
        >>> fl.select(stacked, 1)["fc"]["lora_B"].shape
        torch.Size([3, 2])
    """
    n = _stack_size(stacked, "select")
    if not -n <= index < n:
        raise IndexError(f"select: index {index} is out of range for a stack of {n} adapters.")
    return {path: {leaf: t[index] for leaf, t in names.items()} for path, names in stacked.items()}


def unstack(stacked: dict) -> list[dict]:
    """The list of N adapters in a stacked adapter (inverse of :func:`stack`).

    Example:
        >>> import torch, funclora as fl
        >>> stacked = {"fc": {"lora_A": torch.zeros(3, 2, 4), "lora_B": torch.zeros(3, 5, 2)}}
        >>> adapters = fl.unstack(stacked)
        >>> len(adapters), tuple(adapters[0]["fc"]["lora_A"].shape)
        (3, (2, 4))
    """
    return [select(stacked, i) for i in range(_stack_size(stacked, "unstack"))]


def checked_leaves(adapter, fn: str, what: str) -> dict[str, dict[str, torch.Tensor]]:
    """``adapter`` checked to be ``{path: {leaf: Tensor}}`` (any mappings), as plain dicts."""
    if not isinstance(adapter, Mapping):
        raise TypeError(f"{fn}: {what} must be a dict {{path: {{leaf: Tensor}}}}, got {type(adapter).__name__}.")
    out = {}
    for path, leaves in adapter.items():
        if not isinstance(leaves, Mapping):
            raise TypeError(f"{fn}: {what}[{path!r}] must be a dict {{leaf: Tensor}}, got {type(leaves).__name__}.")
        for leaf, t in leaves.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: {what}[{path!r}][{leaf!r}] is a {type(t).__name__}, expected a torch.Tensor.")
        out[path] = dict(leaves)
    return out


def _same_structure(first: dict, other: dict, i: int) -> None:
    missing = [p for p in first if p not in other]
    extra = [p for p in other if p not in first]
    if missing or extra:
        raise ValueError(f"stack: adapter {i} has other module paths than adapter 0: missing {missing}, "
                         f"unexpected {extra}; only adapters of one config stack.")
    for path, names in first.items():
        if other[path].keys() != names.keys():
            raise ValueError(f"stack: adapter {i}[{path!r}] has leaves {sorted(other[path])}, adapter 0 has "
                             f"{sorted(names)}; only adapters of one config stack.")


def _stack_size(stacked, fn: str) -> int:
    """``N``, the leading size every leaf of a stacked adapter shares."""
    leaves = checked_leaves(stacked, fn, "the stacked adapter")
    sizes = {t.shape[0] if t.dim() else None for names in leaves.values() for t in names.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"{fn}: the leaves have leading sizes {sorted(sizes, key=str)}, not one shared stack size "
                         "N: this adapter is not stacked. fl.stack([a_0, a_1, ...]) makes a stacked adapter; "
                         "an unstacked one needs no select.")
    return sizes.pop()
