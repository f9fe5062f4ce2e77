"""Pure pytree operations on adapters: stacking for ``vmap``, selecting, unstacking.

An adapter is ``{path: {leaf: Tensor}}``; a *stacked* adapter has the same structure with a
leading axis ``N`` on every leaf.
"""

from __future__ import annotations

from collections.abc import Sequence

import optree
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
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack: got no adapters; pass a non-empty list.")
    paths, first, spec = optree.tree_flatten_with_path(adapters[0], none_is_leaf=False)
    for i, a in enumerate(adapters[1:], 1):
        leaves, other = optree.tree_flatten(a, none_is_leaf=False)
        if other != spec:
            raise ValueError(f"stack: adapter {i} has another structure than adapter 0 "
                             f"(paths or leaf names differ): {other} vs {spec}.")
        for path, l0, l1 in zip(paths, first, leaves):
            if l0.shape != l1.shape:
                raise ValueError(f"stack: adapter {i} leaf {'.'.join(path)} has shape {tuple(l1.shape)}, "
                                 f"adapter 0 has {tuple(l0.shape)}; only adapters of one config stack.")
    return optree.tree_map(lambda *xs: torch.stack(xs), *adapters, none_is_leaf=False)


def select(stacked: dict, index: int) -> dict:
    """Adapter ``index`` of a stacked adapter (leaves are views): each leaf ``(N, *shape)`` → ``shape``.

    Example:
        >>> import torch, funclora as fl
        >>> a = {"fc": {"lora_A": torch.zeros(2, 4), "lora_B": torch.ones(3, 2)}}
        >>> stacked = fl.stack([a, a, a])
        >>> fl.select(stacked, 1)["fc"]["lora_B"].shape
        torch.Size([3, 2])
    """
    return optree.tree_map(lambda t: t[index], stacked, none_is_leaf=False)


def unstack(stacked: dict) -> list[dict]:
    """The list of N adapters in a stacked adapter (inverse of :func:`stack`).

    Example:
        >>> import torch, funclora as fl
        >>> stacked = {"fc": {"lora_A": torch.zeros(3, 2, 4), "lora_B": torch.zeros(3, 5, 2)}}
        >>> adapters = fl.unstack(stacked)
        >>> len(adapters), tuple(adapters[0]["fc"]["lora_A"].shape)
        (3, (2, 4))
    """
    sizes = {t.shape[0] for t in optree.tree_leaves(stacked, none_is_leaf=False)}
    if len(sizes) != 1:
        raise ValueError(f"unstack: leaves have different leading sizes {sorted(sizes)}; is this a stacked adapter?")
    return [select(stacked, i) for i in range(sizes.pop())]
