"""A model and a config bound once: the plan, the adapter's shapes, init, checks and counts.

:class:`Bound` resolves everything that does not change between calls: which modules are
targeted (the :class:`~funclora.Plan`), the adapter leaves each needs, where every base
parameter and buffer lives (so a call never walks the module tree), tied weights, and which
targets take the fast paths of :mod:`funclora.core.forward`. It never changes the model.
Other layers (``multi``, ``distributed``, ``io``, ``lora``) read its public attributes.
"""

from __future__ import annotations

from typing import NamedTuple

import optree
import torch
from torch import nn

from ..errors import AdapterMismatchError
from .config import LoraConfig
from .dora import magnitude_init, magnitude_shape, weight_norm
from .dora_forward import dora_view, has_standard_forward
from .lazy import linear_view
from .quantized import OutputRule, dequantized_weight, output_view
from .registry import is_factored
from .rules import Factor, init_factor
from .shadow import Shadower
from .targeting import Plan, Target, make_plan

__all__ = ["Bound", "Adapter"]

Adapter = dict  # {path: {leaf: Tensor}}


class LazyTarget(NamedTuple):
    """A target whose weight the forward replaces by a :class:`~funclora.core.lazy.LoraWeight`."""

    name: str          # the weight's full parameter name
    store: dict        # the owner's _parameters
    leaf: str          # the weight's name in ``store``
    a: str             # adapter leaf of A (``lora_A`` / ``lora_embedding_A``)
    b: str             # adapter leaf of B
    scaling: float
    layout: str        # as LoraParts.layout
    dropout: float     # lora_dropout, applied while ``module.training``
    groups: int
    module: nn.Module


class DoraTarget(NamedTuple):
    """A DoRA target: what the per-call view (or the merged-weight fallback) needs."""

    name: str          # the weight's full parameter name
    store: dict        # the owner's _parameters
    leaf: str          # the weight's name in ``store``
    module_path: str
    kind: str          # as LoraParts.layout: "linear", "conv1d_t", "embedding", "conv"
    view: type | None  # the DoRA view class, or None (a custom forward: the merged DoRA weight instead)


class Bound:
    """``model`` + ``config``, resolved once (see the module docstring).

    Attributes:
        model, config, plan: as given, and the :class:`~funclora.Plan` made from them.
        specs: ``{path: {leaf: Factor | shape}}``: factors of targets, shapes of saved-module
            parameters and trained biases.
        updated: ``{target path: names of the parameters its rule changes}``.
        alias: every parameter name (tied twins too) -> the name ``named_parameters()`` uses.
        owners: every parameter name -> ``(owning module, attribute)``.
        slots: every parameter and buffer name -> ``(owner's _parameters / _buffers, attribute)``.
        slot_twins: names of a module reachable under several paths, after the first.
        lazy: ``{path: LazyTarget}`` for targets whose weight becomes a lazy ``LoraWeight``.
        linear_views: ``{path: (module path, view class)}`` for ``nn.Linear`` targets.
        output_views: ``{path: (module path, view class)}`` for quantized targets (QLoRA).
        dora: ``{path: DoraTarget}`` for DoRA targets (``use_dora=True``).
        generic: ``((path, Target), ...)`` for every other target (the rule's own ``overlay``).
        replaced_names: ``((full name, path, leaf), ...)``: saved-module params and trained biases.
        rnn_paths: paths of ``nn.RNNBase`` modules (torch cannot vmap them).
        shadower: builds each call's view of the module tree.
    """

    def __init__(self, model: nn.Module, config: LoraConfig):
        self.model, self.config = model, config
        self.plan: Plan = make_plan(model, config)
        self.specs, self.updated = _specs(model, self.plan)
        self.rnn_paths = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        self.base_names = {path: tuple((n, f"{t.module_path}.{n}") for n in self.updated[path])
                           for path, t in self.plan.targets.items()}
        # the expected leaves, flattened for the per-call check
        self.want = tuple((path, leaves.keys(), tuple((leaf, tuple(s.shape) if isinstance(s, Factor) else s,
                                                      isinstance(s, Factor)) for leaf, s in leaves.items()))
                          for path, leaves in self.specs.items())
        self._locate(model)
        self._sort_targets()
        self.shadower = Shadower(model)

    def _locate(self, model: nn.Module) -> None:
        """Where every parameter and buffer lives, and which names are tied or shared."""
        first: dict[int, str] = {}
        self.alias: dict[str, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.alias[name] = first.setdefault(id(p), name)
        self.owners = {name: _owner(model, name) for name in self.alias}
        self.slots = {name: (owner._parameters, leaf) for name, (owner, leaf) in self.owners.items()
                      if owner is not None}
        for name, _ in model.named_buffers(remove_duplicate=False):
            owner, leaf = _owner(model, name)
            self.slots[name] = (owner._buffers, leaf)
        # the buffers a training-mode forward clones (BatchNorm updates its running stats in place)
        self.buffer_slots = tuple((name, *self.slots[name]) for name, _ in model.named_buffers())
        # a module reachable under several paths has one slot: later names must not be set
        first_name: dict[tuple[int, str], str] = {}
        self.slot_twins = frozenset(name for name, (store, leaf) in self.slots.items()
                                    if first_name.setdefault((id(store), leaf), name) != name)

    def _sort_targets(self) -> None:
        """Which forward path each target takes (see :mod:`funclora.core.forward`)."""
        targets = self.plan.targets
        self.dora = {path: DoraTarget(f"{t.module_path}.weight", *self.slots[f"{t.module_path}.weight"], t.module_path,
                                      t.rule.layout, dora_view(type(t.module))
                                      if has_standard_forward(t.module, t.rule.layout) else None)
                     for path, t in targets.items() if t.dora and not isinstance(t.rule, OutputRule)}
        self.lazy = {path: LazyTarget(f"{t.module_path}.weight", *self.slots[f"{t.module_path}.weight"],
                                      *t.rule.names, t.scaling, t.rule.layout, t.dropout,
                                      getattr(t.module, "groups", 1), t.module)
                     for path, t in targets.items()
                     if is_factored(t.rule) and not t.dora and f"{t.module_path}.weight" in self.slots}
        self.linear_views = {path: (targets[path].module_path, linear_view(type(spec.module)))
                             for path, spec in self.lazy.items()
                             if spec.layout == "linear" and type(spec.module).forward is nn.Linear.forward}
        self.output_views = {path: (t.module_path, output_view(type(t.module)))
                             for path, t in targets.items() if isinstance(t.rule, OutputRule)}
        self.generic: tuple[tuple[str, Target], ...] = tuple(
            (path, t) for path, t in targets.items()
            if path not in self.lazy and path not in self.output_views and path not in self.dora)
        self.replaced_names = tuple([(f"{p}.{n}", p, n) for p, names in self.plan.saved.items() for n in names]
                                    + [(f"{p}.bias", p, "bias") for p in self.plan.biases])

    # --- adapters -------------------------------------------------------------------------------
    def init(self, generator: torch.Generator | None, dtype) -> Adapter:
        """A fresh adapter (see :meth:`funclora.LoRA.init`)."""
        how = self.config.init_lora_weights
        adapter: Adapter = {}
        for path, t in self.plan.targets.items():
            base_dtype, device = self.base_dtype_device(path)
            leaf_dtype = factor_dtype(base_dtype, dtype)
            adapter[path] = {leaf: init_factor(spec, t.r, how, generator, leaf_dtype, device)
                             for leaf, spec in self.specs[path].items() if isinstance(spec, Factor)
                             and spec.role != "magnitude"}
            if t.dora:  # PEFT's init: ‖W + s·BA‖ with the fresh factors, in the base dtype, then cast
                adapter[path][_MAGNITUDE] = self.initial_magnitude(path, adapter[path], leaf_dtype)
        for name, path, leaf in self.replaced_names:
            adapter.setdefault(path, {})[leaf] = self.model.get_parameter(name).detach().clone()
        return {p: adapter[p] for p in self.specs}

    def initial_magnitude(self, path: str, factors: dict, leaf_dtype: torch.dtype | None = None) -> torch.Tensor:
        """PEFT's initial DoRA magnitude ``‖W + s·BA‖`` (``‖W‖`` for a fresh ``B = 0``), in PEFT's shape.

        When the factors have the base's dtype it is the forward's own norm, so a fresh adapter is
        exactly the identity (PEFT's is too); over an fp16 / bf16 base it is rounded to the base
        dtype first, as PEFT computes it before upcasting.
        """
        t = self.plan.targets[path]
        weight, kind = self.dense_weight(path)
        A, B = (factors[n] for n in t.rule.names)
        leaf_dtype = A.dtype if leaf_dtype is None else leaf_dtype
        groups = getattr(t.module, "groups", 1)
        shape = self.specs[path][_MAGNITUDE].shape
        if weight.dtype == leaf_dtype:
            return weight_norm(weight, A, B, t.scaling, kind, groups=groups).reshape(shape)
        return magnitude_init(weight, kind, A, B, t.scaling, groups=groups).to(device=A.device, dtype=leaf_dtype)

    def leaf_dtypes(self) -> dict[str, dict[str, torch.dtype]]:
        """``{path: {leaf: dtype}}`` that :meth:`init` gives by default."""
        out: dict = {}
        for path in self.plan.targets:
            dtype = factor_dtype(self.base_dtype_device(path)[0], None)
            out[path] = {leaf: dtype for leaf, spec in self.specs[path].items() if isinstance(spec, Factor)}
        for name, path, leaf in self.replaced_names:
            out.setdefault(path, {})[leaf] = self.model.get_parameter(name).dtype
        return {p: out[p] for p in self.specs}

    def base_dtype_device(self, path: str) -> tuple[torch.dtype, torch.device]:
        """The dtype factors follow and the device they live on (a quantized layer: float32, as PEFT)."""
        t = self.plan.targets[path]
        if path in self.output_views:
            return torch.float32, t.module.weight.device
        base = t.module.get_parameter(self.updated[path][0])
        return base.dtype, base.device

    def dense_weight(self, path: str) -> tuple[torch.Tensor, str]:
        """``(W, layout)`` of a target's base weight, detached (a quantized layer's: dequantized, new)."""
        t = self.plan.targets[path]
        if path in self.output_views:
            return dequantized_weight(t.module), "linear"
        return t.module.weight.detach(), t.rule.layout

    def on_meta(self, path: str) -> bool:
        """Whether the model's module under ``path`` has its parameters on the meta device."""
        target = self.plan.targets.get(path)
        module = target.module if target is not None else self.model.get_submodule(path)
        return any(p.is_meta for p in module.parameters())

    # --- checks ---------------------------------------------------------------------------------
    def fits(self, adapter) -> bool:
        """True when ``adapter`` has exactly the expected paths, leaves and (unbatched) shapes, every
        leaf a real floating-point tensor with values (not on ``meta``), each layer's factors of one
        dtype. The per-call check: :meth:`check` explains what does not fit."""
        if not isinstance(adapter, dict) or adapter.keys() != self.specs.keys():
            return False
        floats = _FLOATS
        try:
            for path, leaves, want in self.want:
                given = adapter[path]
                if given.keys() != leaves:
                    return False
                factor_dtype = None
                for leaf, shape, factor in want:
                    t = given[leaf]
                    if t.shape != shape or t.is_meta or not floats.get(t.dtype, False):
                        return False
                    if factor:
                        if factor_dtype is None:
                            factor_dtype = t.dtype
                        elif t.dtype is not factor_dtype:
                            return False
        except AttributeError:  # not a dict, or a leaf that is not a tensor
            return False
        return True

    def check(self, adapter: Adapter, batched: int = 0) -> None:
        """Raise :class:`AdapterMismatchError` unless ``adapter`` has exactly the expected leaves."""
        if batched == 0 and self.fits(adapter):  # fast path; the checks below explain a mismatch
            return
        if not isinstance(adapter, dict):
            raise AdapterMismatchError(f"LoRA: the adapter must be a dict {{path: {{leaf: tensor}}}}, "
                                       f"got {type(adapter).__name__}.")
        if adapter.keys() != self.specs.keys():
            missing = [p for p in self.specs if p not in adapter]
            extra = [p for p in adapter if p not in self.specs]
            raise AdapterMismatchError(
                f"LoRA: the adapter's module paths do not fit this model: missing {missing}, "
                f"unexpected {extra}. Was it made for another model or config?")
        for path, leaves in self.specs.items():
            given = adapter[path]
            if not isinstance(given, dict) or given.keys() != leaves.keys():
                found = sorted(given) if isinstance(given, dict) else type(given).__name__
                raise AdapterMismatchError(
                    f"LoRA: adapter[{path!r}] has leaves {found}, expected {sorted(leaves)}.")
            first_factor = None
            for leaf, spec in leaves.items():
                value = given[leaf]
                self._check_leaf(path, leaf, value)
                if isinstance(spec, Factor):
                    first_factor = first_factor or (leaf, value.dtype)
                    if value.dtype != first_factor[1]:
                        raise AdapterMismatchError(
                            f"LoRA: adapter[{path!r}][{leaf!r}] has dtype {value.dtype} but "
                            f"adapter[{path!r}][{first_factor[0]!r}] has {first_factor[1]}: a layer's LoRA factors "
                            f"must share one dtype. Cast both, e.g. to {first_factor[1]}.")
                want = tuple(spec.shape) if isinstance(spec, Factor) else spec
                got = tuple(value.shape)
                if got[batched:] != want:
                    hint = (" It has extra leading axes: vmap over a stacked adapter "
                            "(torch.func.vmap(lora, in_dims=(0, None)))." if got[-len(want):] == want
                            and len(got) > len(want) else
                            " Was the adapter trained on another model or with another r?")
                    raise AdapterMismatchError(
                        f"LoRA: adapter[{path!r}][{leaf!r}] has shape {got} but the model's {path} "
                        f"needs {want}.{hint}")

    def _check_leaf(self, path: str, leaf: str, value) -> None:
        """Raise unless ``value`` is a real floating-point tensor with values (meta on a meta model)."""
        if not isinstance(value, torch.Tensor):
            raise AdapterMismatchError(
                f"LoRA: adapter[{path!r}][{leaf!r}] is a {type(value).__name__}, expected a torch.Tensor. "
                "Build adapters with lora.init() (or fl.load_adapter) and keep every leaf a tensor.")
        if not _FLOATS.get(value.dtype, False):
            raise AdapterMismatchError(
                f"LoRA: adapter[{path!r}][{leaf!r}] has dtype {value.dtype}, expected a real floating-point "
                "dtype (float32, bfloat16, float16, float64): cast it, e.g. value.float().")
        if value.is_meta and not self.on_meta(path):  # (a model on meta takes a meta adapter)
            raise AdapterMismatchError(
                f"LoRA: adapter[{path!r}][{leaf!r}] is on the meta device: it has a shape but no values, "
                "so the layer's update would be lost. Load or create the adapter on a real device "
                "(fl.load_adapter(folder, device='cpu'), or lora.init()).")

    # --- base tensors ---------------------------------------------------------------------------
    def base(self, name: str, params) -> torch.Tensor:
        """Base parameter ``name``: from ``params`` (tied names resolved) or the model."""
        if params is None:
            owner, leaf = self.owners.get(name, (None, None))
            p = owner._parameters.get(leaf) if owner is not None else None
            return p if p is not None else self.model.get_parameter(name)
        if name in params:
            return params[name]
        try:
            return params[self.alias.get(name, name)]
        except KeyError:
            raise AdapterMismatchError(f"LoRA: the params dict has no entry {name!r} needed by a target; "
                                       "pass the model's full named_parameters().") from None

    def untie(self, params: dict) -> dict:
        """``params`` with every tied twin's name filled in from its canonical name."""
        out = dict(params)
        for name, canonical in self.alias.items():
            if name not in out and canonical in params:
                out[name] = params[canonical]
        return out

    def buffer_clones(self) -> dict[str, torch.Tensor]:
        """A copy of every buffer, for a training-mode forward to update in place (BatchNorm's
        running stats) without touching the model; from cached slots, no module-tree walk."""
        return {name: store[leaf].clone() for name, store, leaf in self.buffer_slots if store[leaf] is not None}

    def tied_groups(self, names) -> dict[str, list[str]]:
        """``{canonical name: all names of its tied group}`` for the tied groups among ``names``."""
        wanted = {self.alias.get(n, n) for n in names}
        groups: dict[str, list[str]] = {}
        for name, canonical in self.alias.items():
            if canonical in wanted and name not in self.slot_twins:  # twins of a shared module are not separate weights
                groups.setdefault(canonical, []).append(name)
        return {c: g for c, g in groups.items() if len(g) > 1}

    def replaced(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """``{full name: tensor}`` of the saved-module parameters and trained biases in ``adapter``."""
        return {name: adapter[path][leaf] for name, path, leaf in self.replaced_names}

    # --- counting -------------------------------------------------------------------------------
    def num_parameters(self, adapter: Adapter | None = None) -> tuple[int, int]:
        """``(trainable, all)`` counted as PEFT does (see :meth:`funclora.LoRA.num_parameters`)."""
        sizes = self.shapes() if adapter is None else optree.tree_map(lambda t: tuple(t.shape), adapter,
                                                                       none_is_leaf=False)
        trainable = copies = 0
        for path, leaves in sizes.items():
            for leaf, shape in leaves.items():
                n = 1
                for s in shape:
                    n *= s
                trainable += n
                if not (path in self.plan.biases and leaf == "bias"):
                    copies += n
        base = sum(_stored_values(p) for p in self.model.parameters())
        return trainable, base + copies

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{path: {leaf: shape}}`` of the adapter."""
        return {p: {leaf: tuple(s.shape) if isinstance(s, Factor) else s for leaf, s in leaves.items()}
                for p, leaves in self.specs.items()}


#: the DoRA magnitude's leaf name (PEFT's: ``<path>.lora_magnitude_vector`` in files)
_MAGNITUDE = "lora_magnitude_vector"

#: dtype -> whether adapter leaves may have it (a dict lookup is the cheapest per-leaf test)
_FLOATS = {d: True for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _specs(model: nn.Module, plan: Plan) -> tuple[dict, dict]:
    """``({path: {leaf: Factor | shape}}, {target path: updated parameter names})``."""
    specs: dict[str, dict[str, Factor | tuple]] = {}
    updated: dict[str, tuple[str, ...]] = {}
    for path, t in plan.targets.items():
        specs[path] = dict(t.rule.factors(t.module, t.r))
        if t.dora:
            shape = ((t.module.out_features,) if isinstance(t.rule, OutputRule) else
                     magnitude_shape(tuple(t.module.weight.shape), t.rule.layout))
            specs[path][_MAGNITUDE] = Factor(shape, "magnitude")
        updated[path] = tuple(t.rule.updated_parameters(t.module))
    for path, names in plan.saved.items():
        module = model.get_submodule(path)
        specs.setdefault(path, {}).update({n: tuple(module.get_parameter(n).shape) for n in names})
    for path in plan.biases:
        specs.setdefault(path, {})["bias"] = tuple(model.get_submodule(path).bias.shape)
    return specs, updated


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """``(module, leaf)`` owning the parameter ``name`` (``(None, name)`` if there is none)."""
    prefix, _, leaf = name.rpartition(".")
    try:
        return model.get_submodule(prefix), leaf
    except AttributeError:
        return None, leaf


def _stored_values(p: torch.Tensor) -> int:
    """How many weights ``p`` holds, counted as PEFT counts them: a bitsandbytes 4-bit parameter
    packs two values per byte of its storage."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def factor_dtype(base_dtype: torch.dtype, dtype) -> torch.dtype:
    """The dtype of new factors: ``dtype`` (None: PEFT's default, fp32 for fp16/bf16 bases; "base")."""
    if dtype is None:
        out = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
    elif dtype == "base":
        out = base_dtype
    elif not isinstance(dtype, torch.dtype):
        raise TypeError(f"LoRA.init: `dtype` must be None, 'base' or a torch.dtype, got {dtype!r}.")
    else:
        out = dtype
    if not out.is_floating_point:  # integer / bool / complex factors cannot train or match PEFT
        raise TypeError(f"LoRA.init: LoRA factors must have a real floating-point dtype, got {out} "
                        f"(the base weight's dtype is {base_dtype}); pass dtype=torch.float32 or another float dtype.")
    return out
