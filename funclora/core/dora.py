"""DoRA (weight-decomposed LoRA) as pure tensor functions, with PEFT 0.21.2's semantics: the norm,
the magnitude's init, merge and unmerge (the forwards are :mod:`funclora.core.dora_forward`).

DoRA rescales each output channel of the LoRA-updated weight to a learned magnitude ``m``::

    W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖          (one norm per output channel, "row")

and, like PEFT, treats the norm as a constant in backward (it is detached). The functions here
hold no state and import nothing from funclora; they work under ``torch.func.grad`` and
``torch.func.vmap`` (e.g. over stacked adapters: batch ``A``, ``B`` and ``m``).

``kind`` names the weight layout, the same names as ``funclora.core.lazy.LoraParts.layout``:

=============  ====================  ==============  ================  ===============
kind           ``W``                 ``A``           ``B``             ``m`` (PEFT)
=============  ====================  ==============  ================  ===============
``linear``     ``(out, in)``         ``(r, in)``     ``(out, r)``      ``(out,)``
``conv1d_t``   ``(in, out)``         ``(r, in)``     ``(out, r)``      ``(out,)``
``embedding``  ``(num, dim)``        ``(r, num)``    ``(dim, r)``      ``(dim,)``
``conv``       ``(out, in/g, *k)``   ``(r, in, *k)`` ``(out, r/g, *1)`` ``(1, out, *1)``
=============  ====================  ==============  ================  ===============

(``conv1d_t`` is transformers' ``Conv1D``, PEFT's ``fan_in_fan_out=True``.)

"Rows" are what PEFT normalises: the rows of ``W`` for Linear, of ``Wᵀ`` for ``Conv1D`` and
Embedding (so an Embedding's magnitude is one value per *embedding dimension*, the norm taken
over the vocabulary), and the flattened kernels of the output channels for convs.

The norm is computed factored, never forming the dense ``out × in`` update::

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·B_i·(W_i Aᵀ) + s²·B_i (A Aᵀ) B_iᵀ

(``‖W_i‖²`` is a constant of the base: pass it as ``base_sq`` to skip recomputing it). The
formula loses accuracy where the update nearly cancels the row (``‖W_i + s·B_iA‖² ≪ ‖W_i‖² +
‖s·B_iA‖²``); the worst rows of each call are recomputed densely (see :func:`weight_norm`).

For grouped convs (``groups > 1``) PEFT's norm is *not* the norm of the layer's effective update:
PEFT reshapes ``B.view(-1, r) @ A.view(r, -1)`` (``(out/g, in·k)``) into the kernel's shape, which
scrambles rows. This module reproduces that (``_blocks``) so outputs equal PEFT's.
"""

from __future__ import annotations

import torch

__all__ = [
    "KINDS",
    "magnitude_shape",
    "magnitude_init",
    "base_sq_norm",
    "weight_norm",
    "dense_weight_norm",
    "dora_scale",
    "merged_weight",
    "unmerged_weight",
    "dora_delta",
]

KINDS = ("linear", "conv1d_t", "embedding", "conv")

#: a row whose factored ``norm²`` is below this fraction of ``‖W_i‖² + ‖s·B_iA‖²`` is ill-conditioned
#: (the factored value may be off by more than ~1e-6 relative in fp32) and is recomputed densely
REPAIR_RATIO = 0.1
#: at most this many rows per call are recomputed densely (a fixed count: no host sync, vmap-safe)
REPAIR_ROWS = 16
#: a weight of at most this many elements gets its norm densely (``W + s·BA`` is then a small
#: temporary, 1 MiB in fp32, and the dense form takes fewer ops than the expansion and its repair)
DENSE_MAX = 1 << 18


def _check_kind(kind: str, fn: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{fn}: `kind` must be one of {KINDS}, got {kind!r}.")


# --- the row view of W, A and B ------------------------------------------------------------------
def _rows(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``W`` as the ``(rows, cols)`` matrix whose row norms PEFT takes (a view, no copy)."""
    if kind == "linear":
        return weight
    if kind in ("conv1d_t", "embedding"):
        return weight.transpose(-2, -1)
    return weight.flatten(1)


def _blocks(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, kind: str, groups: int):
    """``(W3, Bp, Ab)``: PEFT's ``W + s·L`` row ``o = p·g + q`` is ``W3[p, q] + s·Bp[p] @ Ab[q]``.

    Shapes: ``W3 (P, g, c)``, ``Bp (P, r)``, ``Ab (g, r, c)`` with ``P·g = rows`` and
    ``g·c = cols`` of :func:`_rows` (``g = 1`` except grouped convs, where ``L`` is PEFT's
    ``(B.view(-1, r) @ A.view(r, -1)).reshape(W.shape)``; see the module docstring).
    """
    rows = _rows(weight, kind)
    if kind != "conv" or groups == 1:
        b = B if kind != "conv" else B.flatten(1)
        a = A if kind != "conv" else A.flatten(1)
        return rows.unsqueeze(1), b, a.unsqueeze(0)
    r = A.shape[0]
    Bp = B.reshape(-1, r)                                     # (out/g, r)   PEFT's B.view(-1, r)
    Ab = A.reshape(r, groups, -1).transpose(0, 1)             # (g, r, in/g·k)
    W3 = rows.reshape(Bp.shape[0], groups, -1)                # (out/g, g, in/g·k)
    return W3, Bp, Ab


def magnitude_shape(weight_shape, kind: str) -> tuple[int, ...]:
    """The shape of PEFT's ``lora_magnitude_vector`` for a base weight of ``weight_shape``.

    Example:
        >>> magnitude_shape((8, 3, 3, 3), "conv"), magnitude_shape((50, 16), "embedding")
        ((1, 8, 1, 1), (16,))
    """
    _check_kind(kind, "magnitude_shape")
    shape = tuple(weight_shape)
    if kind == "linear":
        return (shape[0],)
    if kind in ("conv1d_t", "embedding"):
        return (shape[1],)
    return (1, shape[0]) + (1,) * (len(shape) - 2)


# --- norms ---------------------------------------------------------------------------------------
def base_sq_norm(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``‖W_i‖²`` per row ``(rows,)``, in fp32 or wider: a constant of the base, compute it once."""
    _check_kind(kind, "base_sq_norm")
    rows = _rows(weight.detach(), kind)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    return rows.square().sum(-1)


def dense_weight_norm(weight, A, B, scaling, kind: str, *, groups: int = 1) -> torch.Tensor:
    """PEFT's norm, computed its way: form ``W + s·L`` densely, take row norms. ``(rows,)``.

    The reference for :func:`weight_norm` (and what it falls back to for ill-conditioned rows).
    Computed in ``torch.promote_types`` of the three dtypes, as PEFT's forward does.
    """
    _check_kind(kind, "dense_weight_norm")
    dtype = torch.promote_types(weight.dtype, torch.promote_types(A.dtype, B.dtype))
    W3, Bp, Ab = _blocks(weight.detach().to(dtype), A.detach().to(dtype), B.detach().to(dtype), kind, groups)
    full = W3 + scaling * torch.einsum("pr,qrc->pqc", Bp, Ab)
    return torch.linalg.vector_norm(full, dim=-1).reshape(-1)


def weight_norm(weight, A, B, scaling, kind: str, *, groups: int = 1, base_sq=None,
                repair_rows: int = REPAIR_ROWS, dense_max: int = DENSE_MAX) -> torch.Tensor:
    """``‖W_i + s·(BA)_i‖`` per row (PEFT's DoRA norm), factored; detached. ``(rows,)``.

    Args:
        weight: the base weight ``W`` in ``kind``'s layout (see the module docstring).
        A, B: ``lora_A`` / ``lora_B`` (``lora_embedding_A`` / ``_B`` for Embedding).
        scaling: ``s``.
        kind: ``"linear"``, ``"conv1d_t"``, ``"embedding"`` or ``"conv"``.
        groups: the conv's ``groups`` (PEFT's row layout for ``groups > 1``).
        base_sq: ``base_sq_norm(weight, kind)`` if precomputed (saves a pass over ``W``).
        repair_rows: how many of the worst-conditioned rows are recomputed densely when their
            factored ``norm²`` is below ``REPAIR_RATIO·(‖W_i‖² + ‖s·(BA)_i‖²)``; 0 disables.
        dense_max: weights of at most this many elements take the dense form (0: always factored).

    Returns:
        ``(rows,)`` in the promoted dtype of ``W``, ``A``, ``B`` (PEFT's forward dtype).

    Cost: ``W Aᵀ`` (``rows·cols·r``) plus ``r``-sized work, against PEFT's dense ``B@A``, sum,
    square and reduce over ``rows × cols``; no ``rows × cols`` temporary. A weight of at most
    :data:`DENSE_MAX` elements takes the dense form instead (fewer ops, exact).

    Example:
        >>> W, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
        >>> torch.allclose(weight_norm(W, A, B, 0.5, "linear"), (W + 0.5 * B @ A).norm(dim=1))
        True
    """
    _check_kind(kind, "weight_norm")
    dtype = torch.promote_types(weight.dtype, torch.promote_types(A.dtype, B.dtype))
    W3, Bp, Ab = _blocks(weight.detach().to(dtype), A.detach().to(dtype), B.detach().to(dtype), kind, groups)
    P, g = W3.shape[0], W3.shape[1]
    if W3.shape[-3:].numel() <= dense_max:  # small: the dense row norms (exact; as PEFT, minus its eye trick)
        dense = (W3[:, 0] + scaling * (Bp @ Ab[0])) if g == 1 else W3 + scaling * torch.einsum("pr,qrc->pqc", Bp, Ab)
        return torch.linalg.vector_norm(dense, dim=-1).reshape(-1)
    gram = Ab @ Ab.transpose(-2, -1)                                    # (g, r, r)  A Aᵀ
    if g == 1:
        u = (W3[:, 0] @ Ab[0].transpose(-2, -1)).unsqueeze(1)          # (P, 1, r)  W_i Aᵀ
        BG = (Bp @ gram[0]).unsqueeze(1)                                # (P, 1, r)  B_i A Aᵀ
        BG_abs = (Bp.abs() @ gram[0].abs()).unsqueeze(1)
    else:
        u = torch.einsum("pqc,qrc->pqr", W3, Ab)
        BG = torch.einsum("pr,qrt->pqt", Bp, gram)
        BG_abs = torch.einsum("pr,qrt->pqt", Bp.abs(), gram.abs())
    B_abs = Bp.abs().unsqueeze(1)
    cross = (u * Bp.unsqueeze(1)).sum(-1)                               # (P, g)
    quad = (BG * Bp.unsqueeze(1)).sum(-1)                               # (P, g)  ‖(BA)_i‖²
    if base_sq is None:
        base_sq = base_sq_norm(weight, kind)
    c = base_sq.detach().to(dtype).reshape(P, g)
    s = scaling
    sq = (c + (2 * s) * cross + (s * s) * quad).reshape(-1)
    # the scale of the terms summed (absolute values): a row whose norm² is small next to it has lost
    # digits to cancellation, between W and the update or inside B_i·A itself
    size = (c + (2 * abs(s)) * (u.abs() * B_abs).sum(-1) + (s * s) * (BG_abs * B_abs).sum(-1)).reshape(-1)
    if repair_rows > 0:
        sq = _repair(sq, size, W3, Bp, Ab, s, min(repair_rows, sq.shape[0]))
    return sq.clamp_min(0).sqrt()


def _repair(sq, size, W3, Bp, Ab, s, k):
    """Recompute densely the ``k`` rows with the smallest ``sq / size`` if that is < REPAIR_RATIO.

    Fixed-size (``topk``) so it needs no host sync and works under ``vmap`` and ``torch.compile``.
    """
    g = W3.shape[1]
    ratio = sq / size.clamp_min(torch.finfo(size.dtype).tiny)
    idx = torch.topk(ratio, k, largest=False).indices                   # (k,) worst rows
    if g == 1:
        rows = W3[idx, 0] + s * (Bp[idx] @ Ab[0])                       # (k, c) dense rows
    else:
        p, q = idx // g, idx % g
        rows = W3[p, q] + s * (Bp[p].unsqueeze(-2) @ Ab[q]).squeeze(-2)
    fixed = torch.where(ratio[idx] < REPAIR_RATIO, rows.square().sum(-1), sq[idx])
    return sq.scatter(0, idx, fixed)


def magnitude_init(weight, kind: str, A=None, B=None, scaling=1.0, *, groups: int = 1) -> torch.Tensor:
    """PEFT's initial ``lora_magnitude_vector``: ``‖W + s·BA‖`` per row, in PEFT's shape.

    With the default init (``B = 0``) this is ``‖W_i‖``; with ``init_lora_weights=False`` PEFT
    takes the norm of the *updated* weight, so a fresh adapter is still plain LoRA's output.
    PEFT computes it in the base weight's dtype (its factors are upcast to fp32 only later), so a
    bf16 base gives a bf16-rounded magnitude; this does the same. Cast to the leaf dtype after.

    Args:
        weight: base weight ``W`` (``kind``'s layout); A, B: the fresh factors, or None (B = 0).

    Returns:
        :func:`magnitude_shape` of ``W``, dtype ``W.dtype`` (fp32 for a conv with fp32 factors,
        as PEFT, whose conv norm is not cast back).

    Example:
        >>> W = torch.randn(8, 3, 3, 3)
        >>> magnitude_init(W, "conv").shape
        torch.Size([1, 8, 1, 1])
    """
    _check_kind(kind, "magnitude_init")
    W = weight.detach()
    shape = magnitude_shape(W.shape, kind)
    if B is None or A is None:
        return torch.linalg.vector_norm(_rows(W, kind), dim=-1).to(W.dtype).reshape(shape)
    dtype = W.dtype if kind != "conv" else torch.promote_types(W.dtype, A.dtype)
    norm = dense_weight_norm(W.to(dtype), A.detach().to(W.dtype), B.detach().to(W.dtype), scaling, kind,
                             groups=groups)
    return norm.to(dtype).reshape(shape)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``m / ‖W + s·ΔW‖`` per row ``(rows,)``, the norm detached (PEFT, DoRA paper §4.3)."""
    return magnitude.reshape(-1) / norm.detach()


# --- merge / unmerge ---------------------------------------------------------------------------
def _delta(weight, A, B, scaling, kind):
    """``s·ΔW`` in ``W``'s layout (PEFT's ``get_delta_weight``; groups = 1)."""
    if kind == "linear":
        return scaling * (B @ A)
    if kind in ("conv1d_t", "embedding"):
        return scaling * (B @ A).transpose(-2, -1)
    return scaling * (B.flatten(1) @ A.flatten(1)).reshape(weight.shape)


def _row_factor(factor: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A per-row ``(rows,)`` factor shaped to broadcast against ``W`` in its layout."""
    if kind == "linear":
        return factor.reshape(-1, 1)
    if kind in ("conv1d_t", "embedding"):
        return factor.reshape(1, -1)
    return factor.reshape(-1, *(1,) * (weight.dim() - 1))


def _no_grouped_merge(kind, groups, fn):
    if kind == "conv" and groups != 1:
        raise NotImplementedError(
            f"{fn}: a conv with groups={groups} cannot be merged: its LoRA update (lora_A a full conv, "
            "lora_B grouped) is not a grouped kernel (PEFT refuses too). Keep the adapter unmerged."
        )


def merged_weight(weight, A, B, magnitude, scaling, kind: str, *, groups: int = 1, return_norm: bool = False):
    """PEFT's DoRA merge: ``W' = (m / ‖W + s·ΔW‖) ⊙ (W + s·ΔW)`` (per row), in ``W``'s dtype.

    Args:
        weight: the base ``W`` (unmerged); A, B, magnitude, scaling: the adapter; kind: the layout.
        return_norm: also return the norm used ``(rows,)``: :func:`unmerged_weight` needs it
            (PEFT caches it in ``merge``: ``W`` cannot be recovered from ``W'`` without it).

    Returns:
        ``W'`` (and the norm): what ``merge`` writes into the weight.

    Example:
        >>> W, A, B = torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2)
        >>> m = torch.rand(3) + 0.5
        >>> torch.allclose(merged_weight(W, A, B, m, 0.5, "linear").norm(dim=1), m)
        True
    """
    _check_kind(kind, "merged_weight")
    _no_grouped_merge(kind, groups, "merged_weight")
    updated = weight + _delta(weight, A, B, scaling, kind).to(weight.dtype)
    norm = torch.linalg.vector_norm(_rows(updated, kind), dim=-1).detach()
    factor = _row_factor(magnitude.reshape(-1) / norm, weight, kind)
    merged = (factor * updated).to(weight.dtype)
    return (merged, norm) if return_norm else merged


def unmerged_weight(merged, A, B, magnitude, scaling, kind: str, norm, *, groups: int = 1) -> torch.Tensor:
    """PEFT's DoRA unmerge: ``W = W' / (m / norm) − s·ΔW``, ``norm`` from :func:`merged_weight`.

    The norm is not recoverable from ``W'`` (every row of ``W'`` has norm ``|m_i|`` whatever
    ``‖W_i + s·ΔW_i‖`` was), so it must be passed: PEFT caches it at merge time
    (``module._cache_store(f"{adapter}-weight_norm", …)``).
    """
    _check_kind(kind, "unmerged_weight")
    _no_grouped_merge(kind, groups, "unmerged_weight")
    factor = _row_factor(magnitude.reshape(-1) / norm, merged, kind)
    return (merged / factor - _delta(merged, A, B, scaling, kind)).to(merged.dtype)


def dora_delta(weight, A, B, magnitude, scaling, kind: str, *, groups: int = 1) -> torch.Tensor:
    """``W' − W``: the DoRA update as a dense delta in ``W``'s layout (for ``LoRA.delta``)."""
    return merged_weight(weight, A, B, magnitude, scaling, kind, groups=groups) - weight
