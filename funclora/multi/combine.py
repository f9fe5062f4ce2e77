"""Mixing adapters into one: PEFT's ``add_weighted_adapter`` ("linear", "cat", "svd"), pure.

For adapters ``a_1 … a_n`` of one :class:`~funclora.LoRA` and weights ``w_i``, per target with
scaling ``s`` let ``c_i = w_i·s``. With ``A_i (r, in)``, ``B_i (out, r)`` (kernels flattened):

======== ============================================================ ===================
method   new factors                                                  new rank per target
======== ============================================================ ===================
linear   ``A = Σ sign(c_i)·√|c_i|·A_i``, ``B = Σ √|c_i|·B_i``          ``r``
         (PEFT's formula; only exact for one adapter: cross terms)
cat      ``A = [c_1·A_1; …; c_n·A_n]``, ``B = [B_1 … B_n]``           ``n·r``
         ⇒ ``B@A = Σ w_i·ΔW_i`` exactly
svd      ``D = Σ w_i·ΔW_i = U S Vᵀ``; ``B = U_k·S_k``, ``A = V_kᵀ``     ``rank`` (default r)
         ⇒ the best rank-k approximation of ``D`` (Eckart–Young)
======== ============================================================ ===================

The new adapter's scaling is exactly 1: the returned config has ``lora_alpha = r`` per target
(``rank_pattern`` / ``alpha_pattern`` name the targets whose rank differs from the config's
``r``) and ``use_rslora=False``. PEFT keeps ``use_rslora`` and so scales an rslora mix by
``√r`` too much (PEFT issues #3761, #3449); funclora does not.

The SVD never forms a dense product larger than needed: ``D = [c_i B_i] @ [A_i]`` is factored
by two QR decompositions and an SVD of an ``(n·r) × (n·r)`` core, which gives the same singular
triplets as ``torch.linalg.svd(D)``.

DoRA adapters: the factors mix as above and the magnitudes linearly, ``m = Σ w_i·m_i``, so one
adapter with weight 1 comes back unchanged (the result is not ``Σ w_i·ΔW_i``: DoRA's update is not
linear in the adapter). PEFT accepts DoRA here but resets every magnitude to ``‖W‖`` (peft#3761).

modules_to_save and trained biases (dense parameters) are mixed as task vectors:
``θ = θ_base + Σ w_i (θ_i − θ_base)`` (PEFT 0.21 refuses: "Cannot add weighted adapters if they
target the same module with modules_to_save").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..core.config import LoraConfig
from ..core.pytree import unstack
from ..core.registry import builtin_kind
from ..core.rules import ConvRule, MultiheadAttentionRule, ParameterRule
from ..errors import AdapterMismatchError

__all__ = ["combine", "Combined", "METHODS"]

METHODS = ("linear", "cat", "svd")


class Combined(NamedTuple):
    """What :func:`combine` returns: the new adapter and the config it needs.

    Unpacks as ``adapter, config = lora.combine(...)``; use it with ``fl.LoRA(model, config)``.
    """

    adapter: dict
    config: LoraConfig


# --- which leaves form a product B@A -------------------------------------------------------------
def _pairs(target) -> list[tuple[str, str, int]]:
    """``[(A leaf, B leaf, experts)]`` of a target whose update is ``s·B@A`` (per expert)."""
    rule, module, path = target.rule, target.module, target.path
    kind = builtin_kind(rule)
    if kind is None:
        raise NotImplementedError(
            f"LoRA.combine: target {path!r} uses the rule {rule!r}, whose update is not known to be B@A; "
            "combine handles the built-in rules (Linear, Conv1D, Embedding, Conv, MultiheadAttention, "
            "target_parameters). Mix such adapters yourself from lora.delta(adapter).")
    if kind is ConvRule and module.groups != 1:
        raise NotImplementedError(
            f"LoRA.combine: {path!r} is a conv with groups={module.groups}; its LoRA update is not a "
            "grouped kernel, so adapters on it cannot be mixed. Do not target this layer.")
    if kind is MultiheadAttentionRule:
        return [("lora_A", "lora_B", 1), ("out_proj.lora_A", "out_proj.lora_B", 1)]
    if kind is ParameterRule:
        shape = tuple(getattr(module, rule.name).shape)
        return [("lora_A", "lora_B", shape[0] if len(shape) == 3 else 1)]
    return [(*rule.names, 1)]


def _expert_stack(A: torch.Tensor, B: torch.Tensor, experts: int, r: int):
    """``A`` → ``(E, r, m)``, ``B`` → ``(E, n, r)`` so that ``ΔW_e ∝ B_e @ A_e``."""
    if experts == 1:
        return A.reshape(1, r, -1), B.reshape(1, B.shape[0], r)
    return A.reshape(experts, r, A.shape[-1]), B.reshape(B.shape[0], r, experts).permute(2, 0, 1)


def _unflat(a: torch.Tensor, b: torch.Tensor, A: torch.Tensor, B: torch.Tensor, experts: int, k: int):
    """Inverse of :func:`_expert_stack` with the rank changed to ``k`` (shapes taken from ``A``, ``B``)."""
    if experts == 1:
        return a[0].reshape(k, *A.shape[1:]), b[0].reshape(B.shape[0], k, *B.shape[2:])
    return a.reshape(experts * k, A.shape[-1]), b.permute(1, 2, 0).reshape(B.shape[0], k * experts)


def _best_rank(b: torch.Tensor, a: torch.Tensor, k: int):
    """Best rank-``k`` factors of ``D = b @ a`` (``b (E, n, R)``, ``a (E, R, m)``) via QR + small SVD.

    Returns ``(A (E, k, m), B (E, n, k))`` with ``B@A`` = the top-k SVD part of ``D`` (zero-padded
    when ``D`` has fewer than ``k`` singular values).
    """
    qb, rb = torch.linalg.qr(b)                              # (E, n, p), (E, p, R)
    qa, ra = torch.linalg.qr(a.transpose(-1, -2))            # (E, m, q), (E, q, R)
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(-1, -2), full_matrices=False)
    j = min(k, s.shape[-1])
    new_b = (qb @ u[..., :j]) * s[..., None, :j]
    new_a = vh[..., :j, :] @ qa.transpose(-1, -2)
    if j < k:
        new_a = torch.cat([new_a, new_a.new_zeros(*new_a.shape[:-2], k - j, new_a.shape[-1])], -2)
        new_b = torch.cat([new_b, new_b.new_zeros(*new_b.shape[:-1], k - j)], -1)
    return new_a, new_b


def _mix_pair(As, Bs, c: list[float], method: str, experts: int, r: int, k: int):
    """New ``(A, B)`` for one product; ``As``/``Bs`` are the n adapters' leaves, ``c_i = w_i·s``."""
    dtype = As[0].dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    flats = [_expert_stack(A.to(work), B.to(work), experts, r) for A, B in zip(As, Bs)]
    if method == "linear":
        a = sum(math.copysign(math.sqrt(abs(ci)), ci) * fa for ci, (fa, _) in zip(c, flats))
        b = sum(math.sqrt(abs(ci)) * fb for ci, (_, fb) in zip(c, flats))
    elif method == "cat":
        a = torch.cat([ci * fa for ci, (fa, _) in zip(c, flats)], dim=-2)
        b = torch.cat([fb for _, fb in flats], dim=-1)
    else:
        a, b = _best_rank(torch.cat([ci * fb for ci, (_, fb) in zip(c, flats)], dim=-1),
                          torch.cat([fa for fa, _ in flats], dim=-2), k)
    new_A, new_B = _unflat(a, b, As[0], Bs[0], experts, k)
    return new_A.to(dtype), new_B.to(dtype)


# --- the config of the result --------------------------------------------------------------------
def _new_config(config: LoraConfig, ranks: dict[str, int], default: int) -> LoraConfig:
    """``config`` with per-target ranks ``ranks`` and scaling exactly 1 everywhere."""
    pattern = {"^" + re.escape(path) + "$": k for path, k in ranks.items() if k != default}
    new = dataclasses.replace(config, r=default, lora_alpha=default, use_rslora=False,
                              rank_pattern=pattern, alpha_pattern=dict(pattern))
    new._custom_modules = dict(config._custom_modules)
    return new


# --- combine -------------------------------------------------------------------------------------
def _as_list(bound, adapters) -> list[dict]:
    if isinstance(adapters, dict):                          # a stacked adapter
        try:
            bound.check(adapters, batched=1)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"LoRA.combine: `adapters` is a dict but not a stacked adapter of "
                                       f"this LoRA: {e} Pass a list of adapters or fl.stack([...]).") from None
        return unstack(adapters)
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise TypeError(f"LoRA.combine: `adapters` must be a list of adapters (or a stacked adapter), "
                        f"got {type(adapters).__name__}.")
    adapters = list(adapters)
    for i, a in enumerate(adapters):
        try:
            bound.check(a)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"LoRA.combine: adapters[{i}] does not fit this LoRA: {e}") from None
    return adapters


def _as_weights(weights, n: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().reshape(-1).tolist()
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise TypeError(f"LoRA.combine: `weights` must be a list of numbers, got {weights!r}.") from None
    if len(values) != n:
        raise ValueError(f"LoRA.combine: got {n} adapters but {len(values)} weights; give one weight per adapter.")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"LoRA.combine: `weights` must be finite numbers, got {values}.")
    return values


def combine(bound, adapters, weights, *, method: str = "svd", rank: int | None = None) -> Combined:
    """Mix ``adapters`` (of one LoRA) with ``weights`` into one adapter and its config.

    Args:
        bound: the :class:`~funclora.core.bound.Bound` of the LoRA all adapters belong to.
        adapters: a list of ``n ≥ 1`` adapters, or a stacked adapter (leading axis ``n``).
        weights: ``n`` numbers (negative allowed: subtracting a task).
        method: ``"linear"``, ``"cat"`` or ``"svd"`` (see the module docstring).
        rank: ``"svd"`` only: the new rank of every target (default: the target's own ``r``).

    Returns:
        :class:`Combined` ``(adapter, config)``: factors of rank ``r`` (linear), ``n·r`` (cat) or
        ``rank`` (svd) with scaling 1; ``fl.LoRA(model, config)`` takes ``adapter``.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(6, 5))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
        >>> a1, a2 = (lora.init(generator=torch.Generator().manual_seed(i)) for i in (1, 2))
        >>> mixed, config = lora.combine([a1, a2], [0.7, 0.3], method="cat")
        >>> config.r, tuple(mixed["0"]["lora_A"].shape)
        (4, (4, 6))
        >>> want = 0.7 * lora.delta(a1)["0.weight"] + 0.3 * lora.delta(a2)["0.weight"]
        >>> torch.allclose(fl.LoRA(model, config).delta(mixed)["0.weight"], want, atol=1e-6)
        True
    """
    if method not in METHODS:
        raise ValueError(f"LoRA.combine: unknown method {method!r}; use one of {list(METHODS)}. (PEFT's "
                         "ties / dare_* / magnitude_prune are not implemented.)")
    if rank is not None and (method != "svd" or not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ValueError(f"LoRA.combine: `rank` is the new rank for method='svd' (a positive int); got "
                         f"rank={rank!r} with method={method!r}.")
    adapters = _as_list(bound, adapters)
    if not adapters:
        raise ValueError("LoRA.combine: got no adapters; pass at least one.")
    w = _as_weights(weights, len(adapters))
    n = len(adapters)

    new: dict[str, dict[str, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for path, t in bound.plan.targets.items():
        k = {"linear": t.r, "cat": n * t.r, "svd": rank or t.r}[method]
        c = [wi * t.scaling for wi in w]
        leaves = {}
        for a_leaf, b_leaf, experts in _pairs(t):
            leaves[a_leaf], leaves[b_leaf] = _mix_pair(
                [ad[path][a_leaf] for ad in adapters], [ad[path][b_leaf] for ad in adapters], c, method, experts, t.r, k)
        if t.dora:  # DoRA: the magnitudes mix linearly (PEFT resets them to ‖W‖, peft#3761)
            leaves["lora_magnitude_vector"] = sum(wi * ad[path]["lora_magnitude_vector"] for wi, ad in zip(w, adapters))
        new[path] = leaves
        ranks[path] = k
    model = bound.model
    dense = [(p, name) for p, names in bound.plan.saved.items() for name in names]
    dense += [(p, "bias") for p in bound.plan.biases]
    for path, name in dense:
        base = model.get_parameter(f"{path}.{name}").detach()
        value = base + sum(wi * (ad[path][name] - base) for wi, ad in zip(w, adapters))
        new.setdefault(path, {})[name] = value.to(adapters[0][path][name].dtype)
    default = {"linear": bound.config.r, "cat": n * bound.config.r, "svd": rank or bound.config.r}[method]
    adapter = {p: new[p] for p in adapters[0]}
    return Combined(adapter, _new_config(bound.config, ranks, default))
