"""The routed weight: ``W`` carrying N stacked adapters' factors, each example using its own.

See :mod:`funclora.multi.route` for what routing is; this file is the tensor subclass and the
ops (linear, addmm, matmul, embedding, conv) it computes with a per-example LoRA branch.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.lazy import _METADATA, _plus, factored_weight, op_table

__all__ = ["ROUTE_INDEX", "NotRoutable", "RoutedParts", "RoutedWeight", "routed_weight"]

# The index of the rows being computed right now: the whole batch, or one distinct adapter's rows
# inside a module that runs once per adapter.
ROUTE_INDEX: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("funclora_route_index", default=None)
# Linear / Conv1D branch: gathered bmm, or (when (N - 1)·tokens per example ≤ this) one matmul over
# all adapters' A with the other adapters' columns zeroed; see _branch.
_DENSE_MAX = 32


class NotRoutable(Exception):
    """This call cannot be routed layer by layer; route falls back to one pass per adapter."""


@dataclass(frozen=True)
class RoutedParts:
    """What a :class:`RoutedWeight` carries besides ``W``.

    Attributes:
        base: the plain base weight ``W``.
        A: stacked ``lora_A`` ``(N, r, in, *kernel)`` or ``lora_embedding_A`` ``(N, r, num)``.
        B: stacked ``lora_B`` ``(N, out, r // groups, *1)`` or ``lora_embedding_B`` ``(N, dim, r)``.
        scaling: ``s``; layout: as :class:`funclora.core.lazy.LoraParts`; path: for messages.
    """

    base: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    layout: str
    path: str
    groups: int = 1


def _rows(x: torch.Tensor, parts: RoutedParts, *, divisible: bool = False) -> torch.Tensor:
    """The routing index for input ``x`` (batch on dim 0), or :class:`NotRoutable`."""
    idx = ROUTE_INDEX.get()
    n = idx.shape[0]
    rows = x.shape[0] if x.dim() >= 2 else -1
    if rows == n or (divisible and rows > 0 and rows % n == 0):
        return idx
    raise NotRoutable(f"the input of {parts.path!r} has shape {tuple(x.shape)}, not {n} examples on dim 0")


def _dense(n_adapters: int, tokens: int) -> bool:
    return (n_adapters - 1) * tokens <= _DENSE_MAX


def _up(h: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, s: float) -> torch.Tensor:
    """``s·h_b @ B[idx[b]]ᵀ`` for ``h (n, M, r)``, ``B (N, out, r)`` → ``(n, M, out)``."""
    n, m, r = h.shape
    big_n = B.shape[0]
    if not _dense(big_n, m):
        return s * torch.bmm(h, B.index_select(0, idx).transpose(1, 2))
    own = idx.view(n, 1, 1, 1) == torch.arange(big_n, device=idx.device).view(1, 1, big_n, 1)
    h = (h.unsqueeze(2) * own).reshape(n, m, big_n * r)          # example b's r columns in slot idx[b]
    return s * (h @ B.permute(1, 0, 2).reshape(B.shape[1], big_n * r).T)


def _branch(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, s: float) -> torch.Tensor:
    """``s·(x_b @ A[idx[b]]ᵀ) @ B[idx[b]]ᵀ`` for ``x3 (n, M, in)``, ``A (N, r, in)``, ``B (N, out, r)``.

    Gathers each example's factors and runs two batched matmuls. With few tokens per example
    (``(N − 1)·M ≤ 32``, e.g. one token each) gathering ``n`` copies of the factors costs more than
    the products, so all ``N`` adapters' ``A`` run as one matmul, each example keeps its own
    adapter's ``r`` columns (the others are zeroed) and one matmul with all ``B`` finishes.
    """
    n, m, _ = x3.shape
    big_n, r = A.shape[0], A.shape[1]
    x3 = x3.to(A.dtype)
    if not _dense(big_n, m):
        h = torch.bmm(x3, A.index_select(0, idx).transpose(1, 2))                # (n, M, r)
    else:
        h = (x3 @ A.reshape(big_n * r, -1).T).view(n, m, big_n, r)               # every adapter's A
        h = h.gather(2, idx.view(n, 1, 1, 1).expand(n, m, 1, r)).squeeze(2)      # (n, M, r): its own
    return _up(h, B, idx, s)


def _linear(input, weight, bias=None):
    parts = weight._route
    idx = _rows(input, parts)
    out = F.linear(input, parts.base, bias)
    y = _branch(input.reshape(idx.shape[0], -1, input.shape[-1]), parts.A, parts.B, idx, parts.scaling)
    return _plus(out, y.reshape(out.shape))


def _addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    parts = mat2._route
    if out is not None:
        raise NotRoutable("torch.addmm(out=...)")
    idx = _rows(mat1, parts, divisible=True)           # Conv1D flattens (n, T, in) to (n·T, in)
    res = torch.addmm(input, mat1, parts.base, beta=beta, alpha=alpha)
    y = _branch(mat1.reshape(idx.shape[0], -1, mat1.shape[-1]), parts.A, parts.B, idx, parts.scaling)
    y = y.reshape(res.shape)
    return _plus(res, y if alpha == 1 else alpha * y)


def _matmul(input, other, *, out=None):
    parts = other._route
    if out is not None:
        raise NotRoutable("torch.matmul(out=...)")
    idx = _rows(input, parts)
    res = torch.matmul(input, parts.base)
    y = _branch(input.reshape(idx.shape[0], -1, input.shape[-1]), parts.A, parts.B, idx, parts.scaling)
    return _plus(res, y.reshape(res.shape))


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False):
    parts = weight._route
    if input.dim() < 1 or input.shape[0] != ROUTE_INDEX.get().shape[0]:
        raise NotRoutable(f"the ids of {parts.path!r} have shape {tuple(input.shape)}")
    idx = ROUTE_INDEX.get()
    out = F.embedding(input, parts.base, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    n, A = idx.shape[0], parts.A                                      # A (N, r, num)
    lead = idx.reshape(n, *([1] * (input.dim() - 1)))
    rows = A[lead, :, input]                                          # (n, *ids, r): A[idx[b], :, ids[b, ...]]
    if padding_idx is not None and rows.requires_grad:                # no gradient into the padding column
        pad = padding_idx if padding_idx >= 0 else padding_idx + A.shape[-1]
        rows = torch.where((input == pad).unsqueeze(-1), rows.detach(), rows)
    y = _up(rows.reshape(n, -1, A.shape[1]), parts.B, idx, parts.scaling)
    return _plus(out, y.reshape(out.shape))


def _make_conv(conv):
    def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        parts = weight._route
        idx = _rows(input, parts)
        out = conv(input, parts.base, bias, stride, padding, dilation, groups)
        n, A, B = idx.shape[0], parts.A, parts.B
        # one grouped conv for the whole batch: example b is group b of A and groups b·g … of B
        x = input.to(A.dtype).reshape(1, n * input.shape[1], *input.shape[2:])
        Ag = A.index_select(0, idx).reshape(n * A.shape[1], *A.shape[2:])
        Bg = B.index_select(0, idx).reshape(n * B.shape[1], *B.shape[2:])
        h = conv(x, Ag, None, stride, padding, dilation, n)
        h = conv(h, Bg, None, 1, 0, 1, n * groups)
        return _plus(out, (parts.scaling * h).reshape(out.shape))

    return _conv


_ROUTED = op_table(_linear, _addmm, _matmul, _embedding, _make_conv)


class RoutedWeight(torch.Tensor):
    """A base weight ``W`` carrying stacked factors; each example uses its own adapter's.

    Built by :func:`route` inside the forward; any op other than those in the module docstring
    makes :func:`route` fall back to one pass per distinct adapter.
    """

    _route: RoutedParts

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func in _METADATA:
                return func(*(a._route.base if isinstance(a, RoutedWeight) else a for a in args), **kwargs)
            if factored_weight(func, args, kwargs, RoutedWeight, "_route"):
                return _ROUTED[func](*args, **kwargs)
            paths = [a._route.path for a in args if isinstance(a, RoutedWeight)]
            raise NotRoutable(f"{getattr(func, '__name__', func)} on the weight of {paths or 'a target'}")


def routed_weight(parts: RoutedParts) -> RoutedWeight:
    weight = parts.base.as_subclass(RoutedWeight)
    weight._route = parts
    return weight
