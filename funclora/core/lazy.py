"""The lazy LoRA weight: a tensor that *is* ``W`` and knows its low-rank update ``s·B@A``.

``LoraWeight`` is an alias of the base weight (made with ``W.as_subclass``) that carries the
factors. Its ``__torch_function__`` intercepts the ops that consume a weight and computes them
factored, never forming the dense ``B@A``:

=====================  ===========================================================
op                     computed as
=====================  ===========================================================
``F.linear``           ``x@Wᵀ + b + s·(drop(x)@Aᵀ)@Bᵀ``
``torch.addmm``        transformers ``Conv1D`` (``W`` stored ``(in, out)``)
``torch.matmul``/``@`` ``x @ W`` with ``W`` stored ``(in, out)``
``F.embedding``        ``E(ids; W) + s·E(ids; Aᵀ)@Bᵀ`` (base ``padding_idx`` honoured)
``F.conv1d/2d/3d``     base conv + ``s·conv_1×1(conv(drop(x); A); B)`` with the call's
                       stride, padding, dilation and groups
=====================  ===========================================================

Metadata reads (``.shape``, ``.dtype``, ...) are answered by ``W``. Any other op sees the dense
``W + s·ΔW`` ("materialization"), so every module still works, only slower; inside
:func:`strict` materialization raises :class:`MaterializationError` instead.

The LoRA branch runs in the factors' dtype (fp32 factors over a bf16 base, as PEFT does); ``s`` is
applied to the ``r``-wide intermediate, and the update is added to the base output in the wider
dtype and rounded once to the base output's dtype. Outside ``torch.func`` transforms and
``torch.compile`` tracing, the add happens in place on the fresh base output (no base op saves its
output for backward), which saves an output-sized tensor and a pass over it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LoraWeight", "LoraParts", "MaterializationError", "strict", "lora_weight"]

_STRICT = contextvars.ContextVar("funclora_strict", default=False)


class MaterializationError(RuntimeError):
    """Raised inside :func:`strict` when an op would form the dense ``W + s·B@A``.

    Example:
        >>> import torch, funclora as fl
        >>> class TransposedLinear(torch.nn.Linear):      # uses its weight through ``.T``, not F.linear
        ...     def forward(self, x):
        ...         return x @ self.weight.T + self.bias
        >>> lora = fl.LoRA(torch.nn.Sequential(TransposedLinear(4, 3)), fl.LoraConfig(target_modules=["0"], r=2))
        >>> adapter, x = lora.init(), torch.randn(2, 4)
        >>> lora(adapter, x).shape                         # works: W + s·B@A is formed for ``.T``
        torch.Size([2, 3])
        >>> with fl.strict():
        ...     lora(adapter, x)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        funclora.core.lazy.MaterializationError: funclora.strict: ... on the LoRA weight of '0' would form the dense W + s·B@A; ...
    """


@contextlib.contextmanager
def strict(enabled: bool = True):
    """Within this context a LoRA weight never materializes: unsupported ops raise.

    Example:
        >>> import torch, funclora as fl
        >>> with fl.strict():
        ...     pass  # run lora(adapter, x) here to prove no dense B@A is formed
    """
    token = _STRICT.set(enabled)
    try:
        yield
    finally:
        _STRICT.reset(token)


class LoraParts(NamedTuple):
    """What a :class:`LoraWeight` carries besides its base tensor.

    Attributes:
        base: the plain base weight ``W`` (same tensor, not a subclass).
        A: ``lora_A`` ``(r, in, *kernel)``, or ``lora_embedding_A`` ``(r, num_embeddings)``.
        B: ``lora_B`` ``(out, r // groups, *1)``, or ``lora_embedding_B`` ``(dim, r)``.
        scaling: ``s`` (``alpha / r`` or ``alpha / sqrt(r)``).
        layout: ``"linear"`` (W ``(out, in)``), ``"conv1d_t"`` (transformers Conv1D, W ``(in, out)``),
            ``"embedding"`` (W ``(num, dim)``) or ``"conv"`` (W ``(out, in/groups, *kernel)``).
        dropout: dropout probability on the LoRA branch input (0 when not training).
        path: module path, for error messages.
    """

    base: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    layout: str
    dropout: float = 0.0
    path: str = ""
    groups: int = 1


def lora_weight(parts: LoraParts) -> "LoraWeight":
    """Build the lazy weight ``W (+) s·B@A`` (call it inside the traced / vmapped function)."""
    weight = parts.base.as_subclass(LoraWeight)
    weight._lora = parts
    return weight


def dense_delta(parts: LoraParts) -> torch.Tensor:
    """``s·ΔW`` in the base weight's layout and the factors' dtype."""
    A, B, s = parts.A, parts.B, parts.scaling
    if parts.layout == "linear":
        return s * (B @ A)
    if parts.layout in ("conv1d_t", "embedding"):
        return s * (B @ A).transpose(-2, -1)
    if parts.layout == "conv":
        if parts.groups != 1:
            raise NotImplementedError(
                f"funclora: the LoRA update of the grouped conv {parts.path!r} (groups={parts.groups}) "
                "is not a grouped kernel, so it has no dense form; its forward is exact, but merge "
                "is impossible. Leave it unmerged or do not target this layer."
            )
        return s * _conv_delta(A, B)
    raise ValueError(f"funclora: unknown LoRA layout {parts.layout!r}")


def _conv_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``ΔW[o, i, k…] = Σ_ρ B[o, ρ] A[ρ, i, k…]`` for ``A (r, in, *k)``, ``B (out, r, *1)``."""
    b = B.reshape(B.shape[0], B.shape[1])
    return (b @ A.reshape(A.shape[0], -1)).reshape(B.shape[0], *A.shape[1:])


def _materialize(parts: LoraParts, what: str) -> torch.Tensor:
    if _STRICT.get():
        raise MaterializationError(
            f"funclora.strict: {what} on the LoRA weight of {parts.path!r} would form the dense "
            "W + s·B@A; only F.linear, torch.addmm/matmul, F.embedding and F.conv1d/2d/3d are "
            "computed factored. Leave strict mode to allow it."
        )
    W = parts.base
    return W + dense_delta(parts).to(W.dtype)


def _dropped(x: torch.Tensor, parts: LoraParts) -> torch.Tensor:
    if x.dtype != parts.A.dtype:
        x = x.to(parts.A.dtype)
    return F.dropout(x, parts.dropout, training=True) if parts.dropout > 0 else x


def _scaled(h: torch.Tensor, s) -> torch.Tensor:
    """``s·h`` on the ``r``-wide intermediate (cheaper than scaling the output-sized update)."""
    return h if s == 1 else h * s


def _in_place(out: torch.Tensor) -> bool:
    """Whether the update may be added into ``out``, a fresh result of the base op.

    Not while torch.compile traces (it fuses the add anyway) nor inside torch.func transforms
    (they forbid mutating a tensor made at an outer level, and a vmapped update may be wider).
    """
    return (type(out) is torch.Tensor and torch._C._functorch.peek_interpreter_stack() is None
            and not torch.compiler.is_compiling())


def _plus(out: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``out + update`` summed in the wider dtype, in ``out``'s dtype (PEFT's rounding)."""
    if _in_place(out):
        return out.add_(update)
    total = out + update
    return total if total.dtype == out.dtype else total.to(out.dtype)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _add_product(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s) -> torch.Tensor:
    """``out + s·h@Bᵀ`` for ``out (..., out)``, ``h (..., r)``, ``B (out, r)``.

    When ``out`` has the factors' dtype this is one fused ``addmm``: in place on ``out`` when
    that is allowed and ``out`` is 2-D or nothing needs gradients (then on a 2-D view), else out
    of place. Otherwise (fp32 factors over a bf16 base, or under ``torch.autocast``, which makes
    ``h`` bf16 while ``B`` stays fp32), and while torch.compile traces (inductor
    fuses the plain ops), ``_plus(out, (s·h)@Bᵀ)``; in place without gradients, ``s`` rides on
    the add (``out.add_(h@Bᵀ, alpha=s)``: one kernel fewer).
    """
    in_place = _in_place(out)
    if out.dtype != h.dtype or h.dtype != B.dtype or (not in_place and torch.compiler.is_compiling()):
        if in_place and not _needs_grad(h, B):
            return out.add_(F.linear(h, B), alpha=s)
        return _plus(out, F.linear(_scaled(h, s), B))
    if out.dim() == 2 and h.dim() == 2:
        return out.addmm_(h, B.t(), alpha=s) if in_place else torch.addmm(out, h, B.t(), alpha=s)
    if in_place and out.is_contiguous() and not _needs_grad(out, h, B):
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
        return out
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(), alpha=s)
    return flat.view(out.shape)


def _add_pointwise(out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s, groups: int, conv) -> torch.Tensor:
    """``out + s·conv_1×1(h; B)`` for ``out (N, out, *sp)``, ``h (N, r, *sp)``, ``B (out, r, *1)``.

    Without gradients in eager mode (one dtype, ``groups == 1``, contiguous ``out`` and ``h``),
    this is one in-place batched matmul on ``out`` seen as ``(N, out, L)``: ``out[n] += s·B@h[n]``,
    with no output-sized temporary. Otherwise the 1×1 conv, then ``_plus`` (with gradients the
    conv's backward is cheaper than the batched matmul's).
    """
    if (groups == 1 and out.dim() == B.dim() and out.dtype == h.dtype == B.dtype and _in_place(out)
            and not _needs_grad(out, h, B) and out.is_contiguous() and h.is_contiguous()):
        b = B.reshape(B.shape[0], B.shape[1]).expand(out.shape[0], -1, -1)
        out.view(out.shape[0], out.shape[1], -1).baddbmm_(b, h.view(h.shape[0], h.shape[1], -1), alpha=s)
        return out
    return _plus(out, conv(_scaled(h, s), B, None, 1, 0, 1, groups))


def _lora_a(x: torch.Tensor, parts: LoraParts) -> torch.Tensor:
    """``drop(x)@Aᵀ`` for ``x (..., in)`` → ``(..., r)``, in the factors' dtype."""
    return F.linear(_dropped(x, parts), parts.A)


def _linear(input, weight, bias=None):
    parts = weight._lora
    out = F.linear(input, parts.base, bias)
    return _add_product(out, _lora_a(input, parts), parts.B, parts.scaling)


def linear_view(cls: type) -> type:
    """The class of a call's view of a targeted ``cls`` (an ``nn.Linear`` keeping Linear's forward).

    Its ``forward`` computes the factored linear straight from the ``LoraParts`` in the view's
    ``_view_state`` (no lazy weight, no ``__torch_function__`` round trip: the hot path of an
    eager call), and its ``weight`` attribute is the lazy :class:`LoraWeight`, built the first
    time anything reads it (a parent reading ``self.fc.weight``, an instance ``forward``, a
    hook). Same results as ``F.linear`` on the lazy weight.
    """
    view = _LINEAR_VIEWS.get(cls)
    if view is None:
        view = _LINEAR_VIEWS[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "forward": _view_forward, "weight": property(_view_weight, doc="The lazy LoRA weight.")})
    return view


_LINEAR_VIEWS: dict[type, type] = {}


def _view_forward(self, input: torch.Tensor) -> torch.Tensor:
    parts, bias = self.__dict__["_view_state"], self._parameters["bias"]
    if type(input) is not LoraWeight and type(bias) is not LoraWeight:
        return _add_product(F.linear(input, parts.base, bias), _lora_a(input, parts), parts.B, parts.scaling)
    return F.linear(input, self.weight, bias)


def _view_weight(self) -> "LoraWeight":
    d = self.__dict__
    weight = d.get("_lora_weight")
    if weight is None:
        weight = d["_lora_weight"] = lora_weight(d["_view_state"])
    return weight


def _factored_linear(input, weight, bias) -> bool:
    """Whether ``F.linear(input, weight, bias)`` is computed factored (only ``weight`` is lazy)."""
    return (type(weight) is LoraWeight and weight._lora.layout == "linear"
            and type(input) is not LoraWeight and type(bias) is not LoraWeight)


def _addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
    parts = mat2._lora
    if out is not None:
        raise MaterializationError("funclora: torch.addmm(out=...) is not supported on a LoRA weight")
    res = torch.addmm(input, mat1, parts.base, beta=beta, alpha=alpha)
    return _add_product(res, _lora_a(mat1, parts), parts.B, parts.scaling * alpha)


def _matmul(input, other, *, out=None):
    parts = other._lora
    if out is not None:
        raise MaterializationError("funclora: torch.matmul(out=...) is not supported on a LoRA weight")
    res = torch.matmul(input, parts.base)
    return _add_product(res, _lora_a(input, parts), parts.B, parts.scaling)


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False):
    parts = weight._lora
    # With max_norm, F.embedding renormalises rows of its weight in place: give it a copy so the
    # user's model is not changed. PEFT also renormalises lora_embedding_A in place; we never touch A.
    base = parts.base if max_norm is None else parts.base.clone()
    out = F.embedding(input, base, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    rows = F.embedding(input, parts.A.transpose(0, 1), padding_idx, None, norm_type, scale_grad_by_freq)
    return _add_product(out, rows, parts.B, parts.scaling)


def _make_conv(conv):
    def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        parts = weight._lora
        out = conv(input, parts.base, bias, stride, padding, dilation, groups)
        h = conv(_dropped(input, parts), parts.A, None, stride, padding, dilation, 1)
        return _add_pointwise(out, h, parts.B, parts.scaling, groups, conv)

    return _conv


# op -> (name of its weight argument, that argument's position, the weight layout it computes)
WEIGHT_OPS = {
    F.linear: ("weight", 1, "linear"),
    torch.addmm: ("mat2", 2, "conv1d_t"),
    torch.Tensor.addmm: ("mat2", 2, "conv1d_t"),
    torch.matmul: ("other", 1, "conv1d_t"),
    torch.Tensor.matmul: ("other", 1, "conv1d_t"),
    torch.Tensor.__matmul__: ("other", 1, "conv1d_t"),
    F.embedding: ("weight", 1, "embedding"),
    F.conv1d: ("weight", 1, "conv"),
    F.conv2d: ("weight", 1, "conv"),
    F.conv3d: ("weight", 1, "conv"),
}


def op_table(linear, addmm, matmul, embedding, make_conv) -> dict:
    """``{op: implementation}`` for every op of :data:`WEIGHT_OPS` (shared with ``route``)."""
    impls = {"linear": linear, "addmm": addmm, "matmul": matmul, "embedding": embedding}
    return {func: make_conv(func) if name.startswith("conv") else impls[name]
            for func, name in ((f, f.__name__.strip("_")) for f in WEIGHT_OPS)}


def factored_weight(func, args, kwargs, cls, attr: str) -> bool:
    """Whether ``func`` is a weight op whose weight argument is the only ``cls`` among ``args``
    and carries (in ``attr``) the layout the op computes."""
    entry = WEIGHT_OPS.get(func)
    if entry is None:
        return False
    name, pos, layout = entry
    weight = args[pos] if len(args) > pos else kwargs.get(name) if kwargs else None
    if not isinstance(weight, cls) or getattr(weight, attr).layout != layout:
        return False
    for i, a in enumerate(args):
        if i != pos and isinstance(a, cls):
            return False
    return True


_FACTORED = op_table(_linear, _addmm, _matmul, _embedding, _make_conv)

# Reads that never depend on the values, answered by W itself.
_METADATA = {
    getter.__get__
    for getter in (
        torch.Tensor.shape, torch.Tensor.dtype, torch.Tensor.device, torch.Tensor.ndim,
        torch.Tensor.requires_grad, torch.Tensor.is_leaf, torch.Tensor.layout,
        torch.Tensor.is_cuda, torch.Tensor.is_meta, torch.Tensor.is_sparse,
        torch.Tensor.is_quantized, torch.Tensor.itemsize, torch.Tensor.nbytes,
        torch.Tensor.grad_fn, torch.Tensor.is_nested, torch.Tensor._version,
    )
} | {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.is_contiguous, torch.Tensor.get_device, torch.Tensor.data_ptr,
    torch.Tensor.__len__, torch.Tensor.is_inference,
}


def _unwrap(value, what):
    if isinstance(value, LoraWeight):
        return _materialize(value._lora, what)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, what) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, what) for k, v in value.items()}
    return value


class LoraWeight(torch.Tensor):
    """A base weight ``W`` that also carries ``A``, ``B`` and ``s`` (see the module docstring).

    Do not build it directly; :func:`lora_weight` does, inside the functional forward.
    """

    _lora: LoraParts

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) == 3 and not kwargs and _factored_linear(*args):  # nn.Linear's call
            return _linear(*args)
        if factored_weight(func, args, kwargs, LoraWeight, "_lora"):  # its ops see the plain base weight only
            return _FACTORED[func](*args, **kwargs) if kwargs else _FACTORED[func](*args)
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func in _METADATA:
                return func(*_plain(args), **kwargs)
            what = getattr(func, "__name__", repr(func))
            return func(*_unwrap(args, what), **_unwrap(kwargs, what))


def _plain(args):
    return tuple(a._lora.base if isinstance(a, LoraWeight) else a for a in args)
