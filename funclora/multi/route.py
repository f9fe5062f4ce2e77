"""Per-example routing: example ``i`` of a batch uses adapter ``index[i]`` of a stacked adapter.

This is multi-tenant serving (PEFT's ``model(x, adapter_names=[...])``) as one forward pass:

* **Linear, transformers Conv1D, Embedding and Conv1d/2d/3d targets** get a *routed weight*: a
  tensor that is ``W`` and carries the stacked factors ``A (N, r, ...)``, ``B (N, out, r, ...)``.
  The base op runs once on the whole batch; the LoRA branch gathers each example's factors
  (``A[index]``, ``B[index]``) and runs batched matmuls (``bmm``); an Embedding looks its rows up
  in ``A[index[i]]`` directly; a conv runs as one grouped conv with a group per example. With
  few tokens per example (``(N − 1)·tokens ≤ 32``, e.g. an MLP or one decoding step) gathering
  ``B`` copies of the factors costs more than the products, so the branch instead multiplies by
  all N adapters' factors at once and zeroes the other adapters' part. No Python loop over
  adapters either way.
* **modules_to_save and trained biases** (``bias="all"`` / ``"lora_only"``) differ per adapter
  too. A saved ``nn.Linear`` (a classifier head) runs as one matmul with all N adapters' weights,
  each example keeping its own adapter's outputs, when that N-fold work is small; any other such
  module runs once per *distinct* adapter on that adapter's rows (as PEFT does), while the rest of
  the model still runs once.
* **Anything else** (nn.MultiheadAttention, ``target_parameters``, user rules, a per-adapter
  module that is not batch-first or whose parameters its parent uses directly): the whole model
  runs once per distinct adapter on that adapter's rows. Same result, PEFT-like cost.

Batch contract: example ``i`` is row ``i`` (dim 0) of every tensor argument whose dim 0 has
``len(index)`` entries (other arguments are shared by all examples), and of the outputs.

``route`` is an inference feature (PEFT refuses ``adapter_names`` in training mode): it always
runs the model in eval mode (no dropout, BatchNorm running statistics), whatever the model's
flags say, and leaves them as they were. Gradients still flow to the stacked adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from ..core.lazy import _STRICT, MaterializationError
from ..core.pytree import select
from ..core.registry import behaves_as_builtin
from ..core.rules import Conv1DRule, ConvRule, EmbeddingRule, LinearRule
from ..errors import AdapterMismatchError
from .routed_weight import ROUTE_INDEX, NotRoutable, RoutedParts, RoutedWeight, routed_weight

__all__ = ["route", "RoutedWeight", "unroutable_targets"]

_ROUTABLE = (LinearRule, Conv1DRule, EmbeddingRule, ConvRule)
# A saved nn.Linear runs as one matmul over all N adapters' weights when that costs at most this
# many extra multiply-adds (a classifier head); else once per distinct adapter.
_DENSE_SAVED_MACS = 1 << 24


# --- arguments and outputs split by rows ---------------------------------------------------------
def _split(tree, rows: torch.Tensor, n: int):
    """``tree`` with every tensor whose dim 0 has ``n`` entries restricted to ``rows``."""
    return pytree.tree_map(
        lambda t: t.index_select(0, rows) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t, tree)


def _has_batch(tree, n: int) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n for t in pytree.tree_leaves(tree))


def _assemble(outs: list, groups: list[torch.Tensor], n: int, where: str):
    """Re-assemble per-group outputs (rows ``groups[j]``) into one batch of ``n`` examples."""
    flat = [pytree.tree_flatten(o) for o in outs]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        raise NotRoutable(f"{where} returns differently structured outputs for different adapters")
    inverse = torch.argsort(torch.cat(groups))
    leaves = []
    for pos, first in enumerate(flat[0][0]):
        column = [leaves_j[pos] for leaves_j, _ in flat]
        if isinstance(first, torch.Tensor):
            if not all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == g.shape[0]
                       for t, g in zip(column, groups)):
                raise NotRoutable(f"an output of {where} has no batch dimension to re-assemble")
            leaves.append(torch.cat(column).index_select(0, inverse.to(first.device)))
        elif all(c is first or c == first for c in column):
            leaves.append(first)
        else:
            raise NotRoutable(f"{where} returns a per-adapter value that is not a batched tensor "
                               f"({type(first).__name__}); e.g. pass use_cache=False")
    return pytree.tree_unflatten(leaves, spec)


def _groups(idx: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(adapter, rows using it)]`` for the distinct adapters in ``idx``, in ascending order."""
    values = torch.unique(idx)
    return [(int(u), torch.nonzero(idx == u).squeeze(1)) for u in values.tolist()]


# --- modules run once per distinct adapter -------------------------------------------------------
def _grouped_forward(params_fn, path: str, called: set):
    """A ``forward(module, *args, **kwargs)`` that runs the module's class forward once per distinct
    adapter on its rows, with that adapter's parameters.

    ``module`` is the call's shadow (funclora/core/shadow.py): the per-adapter parameters are swapped
    into the shadow's own ``_parameters``, never into the model's.
    """

    def routed(module, *args, **kwargs):
        forward = type(module).forward.__get__(module)
        called.add(path)
        idx = ROUTE_INDEX.get()
        n = idx.shape[0]
        if not _has_batch((args, kwargs), n):
            raise NotRoutable(f"the module {path!r} got no input with {n} examples on dim 0")
        stacked = getattr(params_fn, "stacked_linear", None)
        if stacked is not None and len(args) == 1 and not kwargs and args[0].dim() >= 2 and args[0].shape[0] == n:
            y = _saved_linear(args[0], *stacked, idx)
            if y is not None:
                return y
        groups = _groups(idx)
        outs = []
        for u, rows in groups:
            sub_args, sub_kwargs = (args, kwargs) if len(groups) == 1 else _split((args, kwargs), rows, n)
            token = ROUTE_INDEX.set(idx.index_select(0, rows))
            try:
                with torch.nn.utils.stateless._reparametrize_module(module, params_fn(u)):
                    outs.append(forward(*sub_args, **sub_kwargs))
            finally:
                ROUTE_INDEX.reset(token)
        return outs[0] if len(groups) == 1 else _assemble(outs, [g for _, g in groups], n, repr(path))

    return routed


def _saved_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, idx: torch.Tensor):
    """A saved ``nn.Linear`` with per-example weights ``W[idx[i]]`` (``W (N, out, in)``), or None.

    One matmul with all N adapters' weights, each example keeping its own adapter's outputs, when
    the N-fold work is small (a classifier head); otherwise None (run once per distinct adapter).
    """
    big_n, out_f, in_f = W.shape
    rows = x.numel() // in_f
    if (big_n - 1) * rows * in_f * out_f > _DENSE_SAVED_MACS:
        return None
    y = F.linear(x, W.reshape(big_n * out_f, in_f), None if b is None else b.reshape(-1))
    y = y.reshape(x.shape[0], -1, big_n, out_f)
    lead = idx.view(-1, 1, 1, 1).expand(y.shape[0], y.shape[1], 1, out_f)
    return y.gather(2, lead).reshape(*x.shape[:-1], out_f)


# --- route ---------------------------------------------------------------------------------------
def _adapter_count(bound, stacked) -> int:
    if not isinstance(stacked, dict):
        raise AdapterMismatchError(f"LoRA.route: `stacked` must be a stacked adapter (fl.stack([...])), "
                                   f"got {type(stacked).__name__}.")
    sizes = {t.shape[0] if t.dim() else None for leaves in stacked.values() if isinstance(leaves, dict)
             for t in leaves.values() if isinstance(t, torch.Tensor)}
    if len(sizes) != 1 or None in sizes:
        raise AdapterMismatchError(
            f"LoRA.route: every leaf of `stacked` must have the same leading axis N (the adapters); "
            f"found leading sizes {sorted(s for s in sizes if s is not None)}. Build it with fl.stack([a1, a2, ...]).")
    try:
        bound.check(stacked, batched=1)
    except AdapterMismatchError as e:
        raise AdapterMismatchError(f"LoRA.route: `stacked` is not a stack of adapters of this LoRA: {e}") from None
    return sizes.pop()


def _as_index(index, n: int, device) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        t = index
    else:
        try:
            values = list(index)
        except TypeError:
            raise TypeError(f"LoRA.route: `index` must be a list of ints or a 1-D integer tensor, "
                            f"got {type(index).__name__}.") from None
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise TypeError(f"LoRA.route: `index` entries must be ints (adapter numbers), got {bad[0]!r}.")
        t = torch.tensor(values, dtype=torch.long)
    if t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise TypeError(f"LoRA.route: `index` must hold integers (adapter numbers), got dtype {t.dtype}.")
    if t.dim() != 1:
        raise ValueError(f"LoRA.route: `index` must be 1-D (one adapter number per example), got shape "
                         f"{tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError("LoRA.route: `index` is empty; give one adapter number per example.")
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= n:
        value = lo if lo < 0 else hi
        where = int(torch.nonzero(t == value)[0])
        raise IndexError(f"LoRA.route: index[{where}] = {value} is out of range for a stack of N = {n} "
                         f"adapters; valid adapter numbers are 0 … {n - 1}.")
    return t.to(device=device, dtype=torch.long)


def unroutable_targets(bound) -> list[str]:
    """Target paths that make :func:`route` run the whole model once per distinct adapter
    (DoRA, MultiheadAttention, ``target_parameters``, user rules)."""
    return [path for path, t in bound.plan.targets.items() if not _routable(t)]


def _routable(target) -> bool:
    """A (non-DoRA) target whose rule behaves as the built-in Linear / Conv1D / Embedding / Conv rule."""
    return not target.dora and behaves_as_builtin(target.rule, *_ROUTABLE)


def route(bound, stacked: dict, index, args: tuple, kwargs: dict, *, call):
    """Run ``lora.model(*args, **kwargs)`` where example ``i`` uses adapter ``index[i]``.

    Args:
        bound: the LoRA's :class:`~funclora.core.bound.Bound`.
        stacked: ``fl.stack([a_0, …, a_{N-1}])``: every leaf has a leading axis ``N``.
        index: ``B`` adapter numbers in ``[0, N)``: a list of ints or a 1-D integer tensor.
            Repeats and unused adapters are fine.
        args, kwargs: the model's inputs, batch (``B`` examples) on dim 0.
        call: ``LoRA.run``: the forward of one adapter, for models routed one adapter at a time.

    Returns:
        The model's output; row ``i`` equals ``lora(fl.select(stacked, index[i]), x[i:i+1])``.

    Raises:
        IndexError: an index value is ``< 0`` or ``≥ N``.
        ValueError / TypeError: ``index`` is not 1-D integers, or no input has ``B`` rows.
        AdapterMismatchError: ``stacked`` is not a stack of this LoRA's adapters.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
        >>> a0, a1 = (lora.init(generator=torch.Generator().manual_seed(i)) for i in (0, 1))
        >>> x = torch.randn(3, 4)
        >>> out = lora.route(fl.stack([a0, a1]), [1, 0, 1], x)     # example 1 uses a0, the others a1
        >>> out.shape, torch.allclose(out[1], lora(a0, x[1:2])[0], atol=1e-6)
        (torch.Size([3, 3]), True)
    """
    if not torch._C._is_torch_function_enabled():
        raise RuntimeError("LoRA.route: torch function handling is disabled here (DisableTorchFunctionSubclass), "
                           "so the LoRA weights would silently act as the base weights. Call it outside that context.")
    n_adapters = _adapter_count(bound, stacked)
    device = next(t for leaves in stacked.values() for t in leaves.values()).device
    idx = _as_index(index, n_adapters, device)
    n = idx.shape[0]
    if not _has_batch((args, kwargs), n):
        shapes = [tuple(t.shape) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        raise ValueError(f"LoRA.route: `index` has {n} entries but no input has {n} examples on dim 0 "
                         f"(input shapes: {shapes}); give one adapter number per example.")

    plan, model = bound.plan, bound.model
    layered = not unroutable_targets(bound)
    per_adapter = [*plan.saved, *plan.biases]           # modules run once per distinct adapter
    if any(getattr(model.get_submodule(p), "batch_first", True) is False for p in per_adapter):
        layered = False
    token = ROUTE_INDEX.set(idx)
    try:
        if layered:
            try:
                return _route_layers(bound, stacked, idx, args, kwargs)
            except NotRoutable as e:
                reason = str(e)
        else:
            reason = "a target or per-adapter module is not routed layer by layer"
        if _STRICT.get():
            raise MaterializationError(
                f"funclora.strict: LoRA.route would fall back to one forward pass per distinct adapter: "
                f"{reason}. Leave strict mode to allow it.")
        return _route_per_adapter(call, stacked, idx, args, kwargs)
    finally:
        ROUTE_INDEX.reset(token)


def _route_layers(bound, stacked, idx, args, kwargs):
    plan, model = bound.plan, bound.model
    overlay, params_of = {}, {}
    for path, t in plan.targets.items():
        if t.module_path in plan.biases:
            continue                                    # runs per adapter below, with its bias
        a, b = t.rule.names
        parts = RoutedParts(t.module.weight, stacked[path][a], stacked[path][b], t.scaling,
                            t.rule.layout, path, getattr(t.module, "groups", 1))
        overlay[f"{t.module_path}.weight"] = routed_weight(parts)
    for path, names in plan.saved.items():
        def params(u, path=path, names=names):
            return {n: stacked[path][n][u] for n in names}

        module = model.get_submodule(path)
        if type(module).forward is nn.Linear.forward and set(names) <= {"weight", "bias"}:
            params.stacked_linear = (stacked[path]["weight"], stacked[path].get("bias"))
        params_of[path] = params
    for path in plan.biases:
        t = plan.targets.get(path)

        def params(u, path=path, t=t):
            out = {"bias": stacked[path]["bias"][u]}
            if t is not None:                          # a target with a trained bias: its usual lazy weight too
                factors = {k: v[u] for k, v in stacked[path].items() if k != "bias"}
                base = {k: t.module.get_parameter(k) for k in bound.updated[path]}
                out.update(t.rule.overlay(t.module, base, factors, t.scaling, dropout=0.0, path=path))
            return out

        params_of[path] = params
    called: set = set()
    forwards = {path: _grouped_forward(params_fn, path, called) for path, params_fn in params_of.items()}
    out = bound.shadower.build(overlay, training=False, forwards=forwards)(*args, **kwargs)
    if called != params_of.keys():
        raise NotRoutable(f"the forward of {sorted(params_of.keys() - called)} was not called (its parameters "
                           "are used directly by its parent)")
    return out


def _is_kv_cache(value) -> bool:
    """A transformers ``Cache`` (``DynamicCache`` & co.), by class name: transformers is optional."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def _route_per_adapter(call, stacked, idx, args, kwargs):
    n = idx.shape[0]
    groups = _groups(idx)
    cache = next((v for v in pytree.tree_leaves((args, kwargs)) if _is_kv_cache(v)), None)
    if cache is not None and len(groups) > 1:
        raise ValueError(
            f"LoRA.route: this model runs once per distinct adapter (a target or module is not routed layer by "
            f"layer: DoRA, MultiheadAttention, target_parameters, a user rule), and an input holds a "
            f"{type(cache).__name__}: every pass would write its rows into that one KV cache and later passes would "
            "attend to the other adapters' keys. Pass use_cache=False, or run each adapter's rows with its own cache.")
    outs = []
    for u, rows in groups:
        sub_args, sub_kwargs = (args, kwargs) if len(groups) == 1 else _split((args, kwargs), rows, n)
        outs.append(call(None, select(stacked, u), sub_args, sub_kwargs, False))
    if len(groups) == 1:
        return outs[0]
    try:
        return _assemble(outs, [g for _, g in groups], n, "the model")
    except NotRoutable as e:
        raise ValueError(f"LoRA.route: cannot re-assemble the batch: {e}. route needs outputs with the "
                         "batch on dim 0.") from None
