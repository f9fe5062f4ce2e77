"""DoRA's forward per layer kind, as PEFT 0.21.2 computes it, and the call's view of a DoRA layer.

``out = scale·(base(x) + s·B(A(x))) + bias`` with ``scale = m / ‖W + s·ΔW‖`` (the norm detached,
computed factored by :func:`funclora.core.dora.weight_norm`); with dropout active PEFT's
``base(x) + (scale − 1)·base(drop(x)) + scale·s·B(A(drop(x)))`` (one mask for both terms).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._kinds import CONV1D, type_name
from .dora import dora_scale, magnitude_init, weight_norm  # noqa: F401 (magnitude_init: the examples)

__all__ = ["combine", "scaled_rows", "linear_forward", "conv1d_t_forward", "embedding_forward", "conv_forward",
           "DoraParts", "dora_view", "has_standard_forward"]


def combine(result: torch.Tensor, lora: torch.Tensor, scale: torch.Tensor, bias=None, *,
            base_dropped=None) -> torch.Tensor:
    """PEFT's DoRA output, ``result + (scale − 1)·(result − bias) + scale·s·B(A(h))``, in ``result``'s dtype.

    Args:
        result: the base layer's output on ``x``, with its bias (``F.linear(x, W, b)``).
        lora: the branch with the scale folded into ``B``: ``s·(scale ⊙ B)(A(h))``, ``h = x`` or
            ``dropout(x)`` (a per-channel factor on the small ``B``, not a pass over the output).
        scale: :func:`~funclora.core.dora.dora_scale` shaped to broadcast against ``result``
            (``(out,)`` for Linear, ``(out, 1, …)`` for convs); ``bias`` likewise, or None.
        base_dropped: when dropout is active (training and ``p > 0``): the base op without bias
            on ``dropout(x)``, which takes ``result − bias``'s place (PEFT's ``DoraLinearVariant.forward``
            sets ``base_result=None`` and ``DoraLinearLayer.forward`` recomputes ``F.linear(drop(x), W)``).

    Two passes over the output (``scale·result + (lora + (1 − scale)·bias)``, one ``addcmul``); with
    ``scale = 1`` and ``lora = 0`` (a fresh adapter) this is ``result`` exactly, as in PEFT.
    """
    dtype = torch.promote_types(result.dtype, lora.dtype)
    full = result if result.dtype == dtype else result.to(dtype)
    if base_dropped is not None:
        out = full + torch.addcmul(lora, scale - 1, base_dropped.to(dtype))
    else:
        out = torch.addcmul(lora if bias is None else lora + (1 - scale) * bias.to(dtype), scale, full)
    return out if out.dtype == result.dtype else out.to(result.dtype)


def scaled_rows(B: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale ⊙ B``: each output channel's row of ``B`` (``(out, r, *1)``) times its factor."""
    return B * scale.reshape(-1, *(1,) * (B.dim() - 1))


def linear_forward(x, weight, bias, A, B, magnitude, scaling, *, x_dropped=None, norm=None,
                   base_sq=None, result=None) -> torch.Tensor:
    """PEFT's DoRA ``nn.Linear``: ``x (…, in)`` → ``(…, out)``.

    Args:
        x: input ``(…, in)``; weight ``W (out, in)``; bias ``(out,)`` or None.
        A ``(r, in)``, B ``(out, r)``, magnitude ``(out,)``, scaling ``s``.
        x_dropped: ``dropout(x)`` when dropout is active (training, ``p > 0``), else None.
        norm: the precomputed :func:`~funclora.core.dora.weight_norm` ``(out,)``.
        base_sq: ``base_sq_norm`` of ``W`` if precomputed.
        result: the layer's own output ``F.linear(x, W, bias)`` if already computed.

    Example:
        >>> lin = torch.nn.Linear(4, 3)
        >>> A, B = torch.randn(2, 4), torch.zeros(3, 2)
        >>> m = magnitude_init(lin.weight, "linear")
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(linear_forward(x, lin.weight, lin.bias, A, B, m, 2.0), lin(x), atol=1e-6)
        True
    """
    if norm is None:
        norm = weight_norm(weight, A, B, scaling, "linear", base_sq=base_sq)
    scale = dora_scale(magnitude, norm)
    h = x if x_dropped is None else x_dropped
    if h.dtype != A.dtype:
        h = h.to(A.dtype)
    lora = F.linear(F.linear(h, A) * scaling, scaled_rows(B, scale))
    if result is None:
        result = F.linear(x, weight, bias)
    dropped = None if x_dropped is None else F.linear(x_dropped.to(weight.dtype), weight)
    return combine(result, lora, scale, bias, base_dropped=dropped)


def conv1d_t_forward(x, weight, bias, A, B, magnitude, scaling, *, x_dropped=None, norm=None,
                     base_sq=None, result=None) -> torch.Tensor:
    """PEFT's DoRA on a transformers ``Conv1D`` (``W (in, out)``): as :func:`linear_forward` on ``Wᵀ``."""
    if norm is None:
        norm = weight_norm(weight, A, B, scaling, "conv1d_t", base_sq=base_sq)
    return linear_forward(x, weight.transpose(-2, -1), bias, A, B, magnitude, scaling, x_dropped=x_dropped,
                          norm=norm, result=result)


def embedding_forward(ids, weight, A, B, magnitude, scaling, *, padding_idx=None, base_out=None,
                      embed_scale=None, norm=None, base_sq=None) -> torch.Tensor:
    """PEFT's DoRA ``nn.Embedding``: ``ids (…)`` → ``(…, dim)``. No dropout (PEFT applies none).

    PEFT (``DoraEmbeddingVariant.forward``): ``scale·base(ids) + scale·s·E(ids; Aᵀ)@Bᵀ·embed_scale``.

    Args:
        ids: indices; weight ``W (num, dim)``; A ``(r, num)``, B ``(dim, r)``; magnitude ``(dim,)``.
        padding_idx: the base embedding's (its ``A`` column gets no gradient, as PEFT).
        base_out: the base module's output if already computed (it includes any ``embed_scale``);
            else ``F.embedding(ids, W, padding_idx)`` (pass a module's other options via base_out).
        embed_scale: the base module's ``embed_scale`` (e.g. Gemma's scaled embedding) or None.
    """
    if norm is None:
        norm = weight_norm(weight, A, B, scaling, "embedding", base_sq=base_sq)
    scale = dora_scale(magnitude, norm)
    rows = F.embedding(ids, A.transpose(-2, -1), padding_idx)
    lora = F.linear(rows * scaling, scaled_rows(B, scale))
    if embed_scale is not None:
        lora = lora * embed_scale
    if base_out is None:
        base_out = F.embedding(ids, weight, padding_idx)
        if embed_scale is not None:
            base_out = base_out * embed_scale
    return combine(base_out, lora, scale)


def conv_forward(x, weight, bias, A, B, magnitude, scaling, *, stride=1, padding=0, dilation=1, groups=1,
                 x_dropped=None, norm=None, base_sq=None, result=None, result_dropped=None) -> torch.Tensor:
    """PEFT's DoRA ``nn.Conv1d/2d/3d``: ``x (N, in, *sp)`` or unbatched ``(in, *sp)``.

    The LoRA branch is ``conv_1×1(conv(h; A, stride, padding, dilation); B, groups)·s``, with the
    layer's own dilation (PEFT drops dilation on ``lora_A`` and crashes or differs: peft#3697);
    padding modes other than zeros must be applied to ``x`` by the caller, as the module does.

    Args:
        weight ``(out, in/g, *k)``, bias ``(out,)``/None, A ``(r, in, *k)``, B ``(out, r/g, *1)``,
        magnitude ``(1, out, *1)`` (PEFT's shape; any shape with ``out`` elements works).
        x_dropped: ``dropout(x)`` when dropout is active, else None.
        result, result_dropped: the layer's own output on ``x`` (with bias) and on ``x_dropped``
            (without), if already computed.

    PEFT's broadcast of ``(1, out, 1, …)`` turns an unbatched output ``(out, *sp)`` into
    ``(1, out, *sp)``; here it keeps the input's batchedness.
    """
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    if norm is None:
        norm = weight_norm(weight, A, B, scaling, "conv", groups=groups, base_sq=base_sq)
    ones = (1,) * (weight.dim() - 2)
    scale = dora_scale(magnitude, norm).reshape(-1, *ones)
    h = x if x_dropped is None else x_dropped
    if h.dtype != A.dtype:
        h = h.to(A.dtype)
    lora = conv(conv(h, A, None, stride, padding, dilation, 1) * scaling, scaled_rows(B, scale), None, 1, 0, 1,
                groups)
    b = None if bias is None else bias.reshape(-1, *ones)
    if result is None:
        result = conv(x, weight, bias, stride, padding, dilation, groups)
    dropped = result_dropped
    if x_dropped is not None and dropped is None:
        dropped = conv(x_dropped.to(weight.dtype), weight, None, stride, padding, dilation, groups)
    return combine(result, lora, scale, b, base_dropped=dropped)


# --- the call's view of a DoRA layer -----------------------------------------------------------
class DoraParts(NamedTuple):
    """What a DoRA layer's view needs for one call."""

    base: torch.Tensor              # the base weight W (detached, or from an explicit params dict)
    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor         # lora_magnitude_vector
    scaling: float
    kind: str                       # "linear", "conv1d_t", "embedding" or "conv"
    dropout: float                  # lora_dropout while the layer trains, else 0
    groups: int
    path: str


def has_standard_forward(module: nn.Module, kind: str) -> bool:
    """Whether ``module`` runs its layer type's own forward, which the DoRA view reproduces.

    An Embedding always does (the view adds to whatever its forward returns, as PEFT); a
    Linear / Conv subclass with a forward of its own does not, and gets the merged DoRA weight.
    """
    forward = type(module).forward
    if kind == "linear":
        return forward is nn.Linear.forward
    if kind == "conv":
        return forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
    if kind == "conv1d_t":
        return forward is next(c for c in type(module).__mro__ if type_name(c) == CONV1D).forward
    return True


def dora_view(cls: type) -> type:
    """The class of a call's view of a DoRA-adapted ``cls`` layer; its ``_view_state`` is :class:`DoraParts`."""
    view = _VIEWS.get(cls)
    if view is None:
        view = _VIEWS[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "forward": _view_forward,
            "_layer_forward": cls.forward})
    return view


_VIEWS: dict[type, type] = {}


def _view_forward(self, x, *args, **kwargs):
    p: DoraParts = self.__dict__["_view_state"]
    result = self._layer_forward(x, *args, **kwargs)   # the layer's own output: exactly the model's at init
    if p.kind == "embedding":
        return embedding_forward(x, p.base, p.A, p.B, p.magnitude, p.scaling, padding_idx=self.padding_idx,
                                 base_out=result, embed_scale=getattr(self, "embed_scale", None))
    bias = self._parameters.get("bias")
    x_dropped = F.dropout(x, p.dropout, True) if p.dropout else None
    if p.kind == "linear":
        return linear_forward(x, p.base, bias, p.A, p.B, p.magnitude, p.scaling, x_dropped=x_dropped, result=result)
    if p.kind == "conv1d_t":
        return conv1d_t_forward(x, p.base, bias, p.A, p.B, p.magnitude, p.scaling, x_dropped=x_dropped,
                                result=result)
    dropped = None
    if x_dropped is not None:  # the base on the dropped input, without bias, through the layer's own padding
        dropped = self._layer_forward(x_dropped)
        if bias is not None:
            dropped = dropped - bias.reshape(-1, *(1,) * (p.base.dim() - 2))
    padding = self.padding
    if self.padding_mode != "zeros":  # the LoRA branch sees the input as the layer pads it (merge equals apply)
        pad = self._reversed_padding_repeated_twice
        x = F.pad(x, pad, mode=self.padding_mode)
        x_dropped = None if x_dropped is None else F.pad(x_dropped, pad, mode=self.padding_mode)
        padding = 0
    return conv_forward(x, p.base, bias, p.A, p.B, p.magnitude, p.scaling, stride=self.stride, padding=padding,
                        dilation=self.dilation, groups=self.groups, x_dropped=x_dropped, result=result,
                        result_dropped=dropped)
