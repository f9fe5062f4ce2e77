"""``LoRA``: a resolved plan plus the pure forward, merge, unmerge and delta.

The forward is::

    overlay = {path.weight: W (+) s·B@A for each target} ∪ {saved-module params} ∪ {trained biases}
    out     = view(*args, **kwargs)     # view: a shallow shadow of the module tree holding the overlay

The model is never changed, not even during a call: each call builds its own view of the
module tree (:mod:`funclora.shadow`), which shares the model's tensors and holds the overlay, so
other threads, a plain ``model(x)``, and other calls never see it, while a checkpoint's
recompute or a ``generate`` loop that belongs to the call does. In training mode the view holds
copies of the model's buffers, so e.g. BatchNorm running statistics of the user's model stay as
they were. Targeted ``nn.Linear`` modules get a view class (``lazy.linear_view``) that computes
the factored linear directly. While ``torch.compile`` traces, ``torch.func.functional_call``
stands in for the view (the traced swap is not run by the compiled graph).

Tied weights (a language model's input embedding and ``lm_head`` sharing one Parameter) are
treated as PEFT treats them: the base weight is shared, the adapter is not.

- The view sets each overlay tensor on its own module only (``functional_call(...,
  tie_weights=False)`` while compiling): a LoRA (or a modules_to_save copy) on ``embed_tokens``
  / ``wte`` changes only the embedding lookup, never the tied head, and a LoRA on ``lm_head``
  never reaches the embedding.
- An explicit params dict (``lora.apply(params, ...)``) may name a tied weight once, as
  ``named_parameters()`` does; every twin then reads that value.
- ``merge`` spells out every name of a tied group the adapter touches: the adapted name gets
  ``W + s·ΔW``, its twins keep ``W``. Run the result with ``functional_call(model, merged, x,
  tie_weights=False)``; torch's default ``tie_weights=True`` raises "functional_call got
  multiple values for keys [...], which are tied" instead of silently carrying ``ΔW`` into the
  twin. (PEFT's ``merge_adapter`` writes ``ΔW`` into the shared Parameter, so its tied head
  changes too and its merged model differs from its unmerged one — PEFT warns about this,
  issue #2777. funclora's merged forward equals its unmerged one.)
- ``unmerge`` returns the tied form again: one entry per tied group, under the name
  ``named_parameters()`` uses.
- PEFT's opt-in ``ensure_weight_tying=True`` (adapt the twin too, with the embedding's
  factors transposed) is not implemented; ``LoraConfig`` rejects it.
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

import optree
import torch
from torch import nn

from .config import LoraConfig
from .distributed import fsdp_units, fully_shard_used, sharded_forward
from .errors import AdapterMismatchError
from .lazy import LoraParts, linear_view, lora_weight
from .rules import Factor, _FactoredRule, init_factor
from .quantized import OutputRule, output_view
from .shadow import Shadower
from .targeting import Plan, make_plan

__all__ = ["LoRA"]

Adapter = dict  # {path: {leaf: Tensor}}


@contextlib.contextmanager
def _training_mode(model: nn.Module, training: bool | None):
    """Run with every module in ``training`` mode, then restore each module's own flag."""
    if training is None:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class LoRA:
    """LoRA on ``model`` as ``config`` describes, without ever changing ``model``.

    Args:
        model: any ``nn.Module``; it is read, never written.
        config: a :class:`~funclora.LoraConfig` (PEFT's fields).

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=2))
        >>> lora.targeted_module_names
        ['0', '2']
        >>> adapter = lora.init(generator=torch.Generator().manual_seed(0))
        >>> tuple(adapter["0"]["lora_A"].shape), tuple(adapter["0"]["lora_B"].shape)
        ((2, 4), (8, 2))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(lora(adapter, x), model(x))   # a fresh adapter changes nothing
        True
    """

    #: ``torch.func.vmap(lora)`` names its function by ``__name__`` (else ``repr``, the whole plan, per call)
    __name__ = "LoRA"

    def __init__(self, model: nn.Module, config: LoraConfig):
        if not isinstance(model, nn.Module):
            raise TypeError(f"LoRA: `model` must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(config, LoraConfig):
            hint = (" Convert a PEFT config with fl.LoraConfig.from_dict(peft_config.to_dict())."
                    if type(config).__module__.startswith("peft") else "")
            raise TypeError(f"LoRA: `config` must be a funclora.LoraConfig, got "
                            f"{type(config).__module__}.{type(config).__name__}.{hint}")
        self.model = model
        self.config = config
        self.plan: Plan = make_plan(model, config)
        self._specs: dict[str, dict[str, Factor | tuple]] = {}
        self._updated: dict[str, tuple[str, ...]] = {}
        for path, t in self.plan.targets.items():
            self._specs[path] = dict(t.rule.factors(t.module, t.r))
            self._updated[path] = tuple(t.rule.updated_parameters(t.module))
        for path, names in self.plan.saved.items():
            module = model.get_submodule(path)
            self._specs.setdefault(path, {}).update(
                {n: tuple(module.get_parameter(n).shape) for n in names})
        for path in self.plan.biases:
            self._specs.setdefault(path, {})["bias"] = tuple(model.get_submodule(path).bias.shape)
        # recurrent modules: PyTorch cannot vmap them (no batching rule for aten::lstm & co.)
        self._rnn_paths = [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
        # hot-path caches (the plan is fixed): each target's base-parameter names, the expected leaf shapes
        self._base_names = {path: tuple((n, f"{t.module_path}.{n}") for n in self._updated[path])
                            for path, t in self.plan.targets.items()}
        self._want = tuple((path, leaves.keys(), tuple((leaf, tuple(s.shape) if isinstance(s, Factor) else s,
                                                       isinstance(s, Factor)) for leaf, s in leaves.items()))
                           for path, leaves in self._specs.items())
        # parameter name -> the name ``named_parameters()`` lists it under (tied weights)
        first: dict[int, str] = {}
        self._alias: dict[str, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._alias[name] = first.setdefault(id(p), name)
        # every parameter name (tied twins included) -> (module that owns it, attribute name)
        self._owners = {name: _owner(model, name) for name in self._alias}
        # every parameter and buffer name -> (the owner's _parameters / _buffers dict, attribute):
        # where the forward reads base weights and buffers from
        self._slots = {name: (owner._parameters, leaf) for name, (owner, leaf) in self._owners.items()
                       if owner is not None}
        for name, _ in model.named_buffers(remove_duplicate=False):
            owner, leaf = _owner(model, name)
            self._slots[name] = (owner._buffers, leaf)
        # the buffers a training-mode forward clones (BatchNorm updates its running stats in place)
        self._buffer_slots = tuple((name, *self._slots[name]) for name, _ in model.named_buffers())
        # names of a module reachable under several paths: later names share the first one's slot,
        # so the forward must not set them (they would overwrite the overlay set under the first)
        first_name: dict[tuple[int, str], str] = {}
        self._slot_twins = frozenset(name for name, (store, leaf) in self._slots.items()
                                     if first_name.setdefault((id(store), leaf), name) != name)
        # targets whose weight becomes a lazy LoraWeight, with what the per-call overlay needs
        self._lazy = {path: _LazyTarget(f"{t.module_path}.weight", *self._slots[f"{t.module_path}.weight"],
                                        *t.rule.names, t.scaling, t.rule.layout, t.dropout,
                                        getattr(t.module, "groups", 1), t.module)
                      for path, t in self.plan.targets.items()
                      if _builds_lora_weight(t.rule) and f"{t.module_path}.weight" in self._slots}
        # nn.Linear targets (classes that keep Linear's forward): in an eager call their view is a
        # lazy.linear_view, which computes the factored linear without building the lazy weight
        self._linear_views = {path: (self.plan.targets[path].module_path, linear_view(type(spec.module)))
                              for path, spec in self._lazy.items()
                              if spec.layout == "linear" and type(spec.module).forward is nn.Linear.forward}
        # each call runs on its own shallow shadow of the module tree (funclora/shadow.py)
        self._shadower = Shadower(model)
        # quantized layers (QLoRA): the branch goes on the layer's output, in the view (funclora/quantized.py)
        self._output_views = {path: (t.module_path, output_view(type(t.module)))
                              for path, t in self.plan.targets.items() if isinstance(t.rule, OutputRule)}
        self._generic = tuple((path, t) for path, t in self.plan.targets.items()
                              if path not in self._lazy and path not in self._output_views)
        self._replaced_names = tuple([(f"{path}.{n}", path, n) for path, names in self.plan.saved.items() for n in names]
                                     + [(f"{path}.bias", path, "bias") for path in self.plan.biases])

    # --- what is targeted ---------------------------------------------------------------------
    @property
    def targeted_module_names(self) -> list[str]:
        """Module paths that carry LoRA, in ``named_modules`` order (PEFT's attribute)."""
        return list(dict.fromkeys(t.module_path for t in self.plan.targets.values()
                                  if t.path == t.module_path))

    @property
    def targeted_parameter_names(self) -> list[str]:
        """Parameter paths adapted through ``target_parameters``."""
        return [t.path for t in self.plan.targets.values() if t.path != t.module_path]

    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """``{path: {leaf: shape}}`` of the adapter this LoRA expects.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> lora.shapes()
        {'0': {'lora_A': (2, 4), 'lora_B': (8, 2)}, '2': {'weight': (2, 8), 'bias': (2,)}}
        """
        return {p: {leaf: tuple(s.shape) if isinstance(s, Factor) else s for leaf, s in leaves.items()}
                for p, leaves in self._specs.items()}

    # --- adapters -----------------------------------------------------------------------------
    def init(self, *, generator: torch.Generator | None = None, dtype=None) -> Adapter:
        """A fresh adapter: PEFT's init per ``config.init_lora_weights``; copies for saved modules.

        Args:
            generator: seeds the random factors.
            dtype: factor dtype. ``None`` (PEFT's default): the base weight's dtype, with fp16 /
                bf16 bases given fp32 factors; ``"base"``: always the base weight's dtype; or a
                ``torch.dtype``.

        Returns:
            ``{path: {leaf: Tensor}}``: ``lora_A (r, in)`` / ``lora_B (out, r)`` for Linear,
            ``lora_embedding_A (r, num)`` / ``lora_embedding_B (dim, r)`` for Embedding, the
            parameters of each saved module, and ``bias`` for trained biases.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter = lora.init(generator=torch.Generator().manual_seed(0))
        >>> torch.count_nonzero(adapter["0"]["lora_B"]).item()   # B starts at zero: a no-op
        0
        >>> lora.init(dtype=torch.bfloat16)["0"]["lora_A"].dtype
        torch.bfloat16
        """
        how = self.config.init_lora_weights
        adapter: Adapter = {}
        for path, t in self.plan.targets.items():
            base_dtype, device = self._base_dtype_device(path)
            leaf_dtype = _factor_dtype(base_dtype, dtype)
            adapter[path] = {leaf: init_factor(spec, t.r, how, generator, leaf_dtype, device)
                             for leaf, spec in self._specs[path].items() if isinstance(spec, Factor)}
        for path, names in self.plan.saved.items():
            module = self.model.get_submodule(path)
            adapter.setdefault(path, {}).update(
                {n: module.get_parameter(n).detach().clone() for n in names})
        for path in self.plan.biases:
            adapter.setdefault(path, {})["bias"] = self.model.get_submodule(path).bias.detach().clone()
        return {p: adapter[p] for p in self._specs}

    def leaf_dtypes(self) -> dict[str, dict[str, torch.dtype]]:
        """``{path: {leaf: dtype}}`` that :meth:`init` gives (without allocating an adapter).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8).bfloat16(), torch.nn.Linear(8, 2).bfloat16())
        >>> fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["1"], r=2)).leaf_dtypes()
        {'0': {'lora_A': torch.float32, 'lora_B': torch.float32}, '1': {'weight': torch.bfloat16, 'bias': torch.bfloat16}}
        """
        out: dict = {}
        for path, t in self.plan.targets.items():
            dtype = _factor_dtype(self._base_dtype_device(path)[0], None)
            out[path] = {leaf: dtype for leaf, spec in self._specs[path].items() if isinstance(spec, Factor)}
        for path, names in self.plan.saved.items():
            module = self.model.get_submodule(path)
            out.setdefault(path, {}).update({n: module.get_parameter(n).dtype for n in names})
        for path in self.plan.biases:
            out.setdefault(path, {})["bias"] = self.model.get_submodule(path).bias.dtype
        return {p: out[p] for p in self._specs}

    def _base_dtype_device(self, path: str) -> tuple[torch.dtype, torch.device]:
        """The dtype factors follow and the device they live on (a quantized layer: float32, as PEFT)."""
        t = self.plan.targets[path]
        if path in self._output_views:
            return torch.float32, t.module.weight.device
        base = t.module.get_parameter(self._updated[path][0])
        return base.dtype, base.device

    def check(self, adapter: Adapter, *, batched: int = 0) -> None:
        """Raise :class:`AdapterMismatchError` unless ``adapter`` has exactly the expected leaves.

        ``batched`` is the number of leading stack axes each leaf may carry.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> lora.check(lora.init())
        >>> lora.check(fl.stack([lora.init(), lora.init()]), batched=1)
        """
        if batched == 0 and self._fits(adapter):  # fast path; the checks below explain a mismatch
            return
        if not isinstance(adapter, dict):
            raise AdapterMismatchError(f"LoRA: the adapter must be a dict {{path: {{leaf: tensor}}}}, "
                                       f"got {type(adapter).__name__}.")
        if adapter.keys() != self._specs.keys():
            missing = [p for p in self._specs if p not in adapter]
            extra = [p for p in adapter if p not in self._specs]
            raise AdapterMismatchError(
                f"LoRA: the adapter's module paths do not fit this model: missing {missing}, "
                f"unexpected {extra}. Was it made for another model or config?")
        for path, leaves in self._specs.items():
            given = adapter[path]
            if not isinstance(given, dict) or given.keys() != leaves.keys():
                found = sorted(given) if isinstance(given, dict) else type(given).__name__
                raise AdapterMismatchError(
                    f"LoRA: adapter[{path!r}] has leaves {found}, expected {sorted(leaves)}.")
            factor_dtype = None
            for leaf, spec in leaves.items():
                value = given[leaf]
                if not isinstance(value, torch.Tensor):
                    raise AdapterMismatchError(
                        f"LoRA: adapter[{path!r}][{leaf!r}] is a {type(value).__name__}, expected a torch.Tensor. "
                        "Build adapters with lora.init() (or fl.load_adapter) and keep every leaf a tensor.")
                if not _FLOATS.get(value.dtype, False):
                    raise AdapterMismatchError(
                        f"LoRA: adapter[{path!r}][{leaf!r}] has dtype {value.dtype}, expected a real floating-point "
                        "dtype (float32, bfloat16, float16, float64): cast it, e.g. value.float().")
                if value.is_meta and not self._on_meta(path):  # (a model on meta takes a meta adapter)
                    raise AdapterMismatchError(
                        f"LoRA: adapter[{path!r}][{leaf!r}] is on the meta device: it has a shape but no values, "
                        "so the layer's update would be lost. Load or create the adapter on a real device "
                        "(fl.load_adapter(folder, device='cpu'), or lora.init()).")
                if isinstance(spec, Factor):
                    if factor_dtype is None:
                        factor_dtype = (leaf, value.dtype)
                    elif value.dtype != factor_dtype[1]:
                        raise AdapterMismatchError(
                            f"LoRA: adapter[{path!r}][{leaf!r}] has dtype {value.dtype} but "
                            f"adapter[{path!r}][{factor_dtype[0]!r}] has {factor_dtype[1]}: a layer's LoRA factors "
                            f"must share one dtype. Cast both, e.g. to {factor_dtype[1]}.")
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

    def _on_meta(self, path: str) -> bool:
        """Whether the model's module under ``path`` has its parameters on the meta device."""
        target = self.plan.targets.get(path)
        module = target.module if target is not None else self.model.get_submodule(path)
        return any(p.is_meta for p in module.parameters())

    def _fits(self, adapter) -> bool:
        """True when ``adapter`` has exactly the expected paths, leaves and (unbatched) shapes, every
        leaf a real floating-point tensor with values (not on ``meta``), each layer's factors of one
        dtype. The per-call check: :meth:`check` explains what does not fit."""
        if not isinstance(adapter, dict) or adapter.keys() != self._specs.keys():
            return False
        floats = _FLOATS
        try:
            for path, leaves, want in self._want:
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

    # --- forward ------------------------------------------------------------------------------
    def __call__(self, adapter: Adapter, *args, **kwargs):
        """``model(*args, **kwargs)`` with ``adapter`` applied; base params read from the model.

        The model is not changed. Gradients flow to the adapter's tensors (``.backward()`` or
        ``torch.func.grad``) and never to the model's own parameters, which are read as constants
        (detached), as if frozen; to differentiate w.r.t. base weights too, pass them to
        :meth:`apply`. ``torch.func.vmap(lora, in_dims=(0, None))`` runs a stacked adapter.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter = lora.init(generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(3, 4)
        >>> lora(adapter, x).shape                                  # x (3, 4) -> (3, 2)
        torch.Size([3, 2])
        >>> grads = torch.func.grad(lambda a: lora(a, x).sum())(adapter)
        >>> tuple(grads["0"]["lora_B"].shape)
        (8, 2)
        >>> torch.func.vmap(lora, in_dims=(0, None))(fl.stack([adapter, adapter]), x).shape
        torch.Size([2, 3, 2])
        """
        return self._forward(None, adapter, args, kwargs, None)

    def apply(self, params: dict[str, torch.Tensor], adapter: Adapter, *args, **kwargs):
        """Same as ``__call__`` with an explicit base-params dict ``{name: Tensor}`` (e.g. from ``merge``).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter, x = lora.init(), torch.randn(3, 4)
        >>> params = {n: p.detach() for n, p in model.named_parameters()}
        >>> torch.equal(lora.apply(params, adapter, x), lora(adapter, x))
        True
        """
        return self._forward(params, adapter, args, kwargs, None)

    def _forward(self, params, adapter, args, kwargs, training):
        if not torch._C._is_torch_function_enabled():
            raise RuntimeError(
                "LoRA: torch function handling is disabled here (DisableTorchFunctionSubclass or "
                "DisableTorchFunction), so the LoRA weights would silently act as the plain base "
                "weights. Call the LoRA forward outside that context.")
        if not self._fits(adapter):
            self.check(adapter)  # raises, saying what does not fit
        if fully_shard_used():
            units = fsdp_units(self.model)
            if units:  # FSDP2-sharded base: the overlay goes onto each unit's all-gathered weights
                return sharded_forward(self, params, adapter, args, kwargs, training, units)
        try:
            if torch.compiler.is_compiling():  # traced: functional_call's swap is compiled away
                if training is None:
                    return self._traced_call(params, adapter, args, kwargs)
                with _training_mode(self.model, training):
                    return self._traced_call(params, adapter, args, kwargs)
            return self._bind(params, adapter, training)(*args, **kwargs)
        except RuntimeError as e:
            if self._rnn_paths and _NO_RNN_BATCHING.search(str(e)):
                raise _rnn_vmap_error(self.model, self._rnn_paths, str(e)) from None
            if self._output_views and "must override the setup_context" in str(e):
                kinds = sorted({type(self.plan.targets[p].module).__name__ for p in self._output_views})
                raise RuntimeError(
                    f"LoRA: torch.func transforms (vmap, grad) cannot run through the quantized layers "
                    f"{kinds} at {list(self._output_views)[:3]}: their library's autograd.Function has no "
                    "setup_context. Run the adapters one at a time ([lora(fl.select(stacked, i), x) ...]) "
                    "or lora.route(stacked, index, x), and train with loss.backward().") from e
            raise

    def bind(self, adapter: Adapter, *, params: dict[str, torch.Tensor] | None = None,
             training: bool | None = None) -> nn.Module:
        """The model with ``adapter`` applied, as a module: a shallow shadow that shares its tensors.

        Calling the result (its ``forward``, its ``generate``, any method that runs the model)
        runs with the adapter, as often as you like; the model itself stays untouched, and other
        threads or a plain ``model(x)`` see only the base weights. ``lora(adapter, x)`` is
        ``lora.bind(adapter)(x)``. Bind inside the function you ``vmap`` / ``grad`` (the lazy
        weights it holds belong to the transform that made them).

        Args:
            adapter: an adapter of this LoRA (unstacked).
            params: base params ``{name: Tensor}`` to use instead of the model's (as :meth:`apply`).
            training: train/eval flag for every module of the view (``None``: the model's own flags).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
        >>> adapter, x = lora.init(generator=torch.Generator().manual_seed(0)), torch.randn(3, 4)
        >>> bound = lora.bind(adapter)
        >>> torch.equal(bound(x), lora(adapter, x)), torch.allclose(bound(x), model(x))
        (True, False)
        >>> bound[0].weight is model[0].weight, bound[1] is model[1]   # the view holds the LoRA; untouched parts are shared
        (False, True)
        """
        if not self._fits(adapter):
            self.check(adapter)
        return self._bind(params, adapter, training)

    def _bind(self, params, adapter, training) -> nn.Module:
        views: dict = {}
        tensors = self._tensors(params, adapter, training, views)
        return self._shadower.build(tensors, training=training, views=views)

    def _traced_call(self, params, adapter, args, kwargs):
        """The forward while torch.compile traces: ``functional_call`` (its swap is not run, only traced)."""
        tensors = self._tensors(params, adapter, None)
        return torch.func.functional_call(self.model, tensors, args, kwargs, tie_weights=False, strict=False)

    def _tensors(self, params, adapter, training, views: dict | None = None) -> dict[str, torch.Tensor]:
        """Every tensor the call replaces: the overlay, detached base weights, buffer copies.

        With ``views`` (a dict to fill), targeted ``nn.Linear`` modules get ``{module path:
        (view class, LoraParts)}`` there instead of a lazy weight (see ``lazy.linear_view``).
        """
        if params is not None:
            tensors = self._untie(params)
            tensors.update(self._overlay(adapter, tensors, training=training, views=views))
        elif torch.is_grad_enabled():  # base weights read from the model are constants: gradients reach only the adapter
            tensors = {}
            for name, (owner, leaf) in self._owners.items():  # cached owners: no module-tree walk per call
                p = owner._parameters.get(leaf)
                if p is not None and p.requires_grad:
                    tensors[name] = p.detach()
            tensors.update(self._overlay(adapter, None, detach=True, training=training, views=views))
        else:
            tensors = self._overlay(adapter, None, training=training, views=views)
        if self.model.training if training is None else training:
            tensors.update(self._buffer_clones())
        for name in self._slot_twins:
            tensors.pop(name, None)
        return tensors

    def _buffer_clones(self) -> dict[str, torch.Tensor]:
        """A copy of every buffer, for a training-mode forward to update in place (BatchNorm's
        running stats) without touching the model; from cached slots, no module-tree walk."""
        return {name: store[leaf].clone() for name, store, leaf in self._buffer_slots if store[leaf] is not None}

    def _untie(self, params):
        out = dict(params)
        for name, canonical in self._alias.items():
            if name not in out and canonical in params:
                out[name] = params[canonical]
        return out

    def _base(self, name: str, params) -> torch.Tensor:
        if params is None:
            owner, leaf = self._owners.get(name, (None, None))
            p = owner._parameters.get(leaf) if owner is not None else None
            return p if p is not None else self.model.get_parameter(name)
        if name in params:
            return params[name]
        try:
            return params[self._alias.get(name, name)]
        except KeyError:
            raise AdapterMismatchError(f"LoRA: the params dict has no entry {name!r} needed by a target; "
                                       "pass the model's full named_parameters().") from None

    def _overlay(self, adapter: Adapter, params, detach: bool = False, training: bool | None = None,
                 views: dict | None = None) -> dict[str, torch.Tensor]:
        out = {}
        linear_views = self._linear_views if views is not None else {}
        for path, (name, store, leaf, a, b, scaling, layout, dropout, groups, module) in self._lazy.items():
            w = store[leaf] if params is None else self._base(name, params)
            factors = adapter[path]  # the common case, built without the rule's generic dict plumbing
            train = module.training if training is None else training
            parts = LoraParts(w.detach() if detach else w, factors[a], factors[b], scaling, layout,
                              dropout if train else 0.0, path, groups)
            view = linear_views.get(path)
            if view is None:
                out[name] = lora_weight(parts)
            else:
                views[view[0]] = view[1], parts
        for path, (module_path, cls) in self._output_views.items():
            t = self.plan.targets[path]
            if views is None:  # torch.compile / an explicit overlay: no view to add the branch in
                t.rule.overlay(t.module, {}, adapter[path], t.scaling, path=path)  # raises, naming the layer
            dropout = t.dropout if (t.module.training if training is None else training) else 0.0
            views[module_path] = cls, LoraParts(None, adapter[path]["lora_A"], adapter[path]["lora_B"],
                                                t.scaling, "linear", dropout, path)
        for path, t in self._generic:
            base = {n: self._base(full, params) for n, full in self._base_names[path]}
            if detach:
                base = {n: w.detach() for n, w in base.items()}
            dropout = t.dropout if (t.module.training if training is None else training) else 0.0
            for n, v in t.rule.overlay(t.module, base, adapter[path], t.scaling, dropout=dropout, path=path).items():
                out[f"{t.module_path}.{n}"] = v
        for name, path, leaf in self._replaced_names:  # modules_to_save and trained biases
            out[name] = adapter[path][leaf]
        return out

    # --- many adapters (funclora/route.py, funclora/combine.py) --------------------------------
    def route(self, stacked: Adapter, index, *args, **kwargs):
        """Example ``i`` of the batch uses adapter ``index[i]`` of ``stacked`` (see :mod:`funclora.route`).

        Args:
            stacked: ``fl.stack([a_0, …, a_{N-1}])`` (every leaf has a leading axis ``N``).
            index: ``B`` adapter numbers in ``[0, N)`` (list of ints or 1-D integer tensor).
            args, kwargs: the model's inputs, ``B`` examples on dim 0.

        Returns:
            The model's output; row ``i`` equals ``lora(fl.select(stacked, index[i]), x[i:i+1])``.
            Runs in eval mode (an inference feature, as PEFT's ``adapter_names``).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapters = [lora.init(generator=torch.Generator().manual_seed(i)) for i in range(3)]
        >>> adapters = [{p: {k: v + 0.1 * i for k, v in a[p].items()} for p in a} for i, a in enumerate(adapters)]
        >>> x, index = torch.randn(4, 4), torch.tensor([2, 0, 0, 1])
        >>> out = lora.route(fl.stack(adapters), index, x)          # (4, 2)
        >>> torch.allclose(out[0], lora(adapters[2], x[:1])[0], atol=1e-6)
        True
        """
        from .route import route

        return route(self, stacked, index, args, kwargs)

    def combine(self, adapters, weights, method: str = "svd", rank: int | None = None):
        """Mix adapters into one: ``(adapter, config)`` (see :mod:`funclora.combine`).

        Args:
            adapters: ``n`` adapters of this LoRA (a list, or a stacked adapter).
            weights: ``n`` numbers.
            method: ``"linear"`` (PEFT's formula, rank ``r``, inexact for ``n > 1``), ``"cat"``
                (exact ``Σ wᵢ·ΔWᵢ``, rank ``n·r``) or ``"svd"`` (best rank-``rank`` approximation).
            rank: the new rank for ``"svd"`` (default: each target's ``r``).

        Returns:
            ``(adapter, config)``; run it with ``fl.LoRA(model, config)``.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> a1, a2 = (lora.init(generator=torch.Generator().manual_seed(i)) for i in (1, 2))
        >>> mixed, config = lora.combine([a1, a2], [0.7, 0.3], method="cat")
        >>> config.r, tuple(mixed["0"]["lora_A"].shape)
        (4, (4, 4))
        """
        from .combine import combine

        return combine(self, adapters, weights, method=method, rank=rank)

    # --- merge --------------------------------------------------------------------------------
    def delta(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """``{param name: s·ΔW}`` for each adapted weight, keyed like :meth:`merge`'s params.

        Each ``ΔW`` has its parameter's shape (``(out, in)`` for a Linear, the kernel's shape for
        a conv). Saved modules and trained biases are not deltas: see :meth:`merge`.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter = lora.init(generator=torch.Generator().manual_seed(0))
        >>> {name: tuple(d.shape) for name, d in lora.delta(adapter).items()}
        {'0.weight': (8, 4)}
        """
        self.check(adapter)
        out = {}
        for path, t in self.plan.targets.items():
            try:
                deltas = t.rule.delta(t.module, adapter[path], t.scaling)
            except NotImplementedError as e:
                raise NotImplementedError(f"LoRA.merge: cannot form the update of {path!r}: {e}") from None
            out.update({f"{t.module_path}.{n}": d for n, d in deltas.items()})
        return out

    def merge(self, adapter: Adapter, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """New params ``{name: W + s·ΔW}`` with saved modules and trained biases replaced.

        Running the model with these params (``functional_call(model, merged, x)``) equals
        ``lora(adapter, x)``. ``params`` defaults to the model's ``named_parameters()``. In
        training mode pass copies of the buffers too (``{**merged, **{n: b.clone() for n, b in
        model.named_buffers()}}``), or BatchNorm updates the model's own running statistics, as
        any forward of the model in training mode does; ``functional_call`` also swaps the
        tensors into the model for the duration of the call, so do not share the model with
        other threads meanwhile (``lora(adapter, x)`` never touches it).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter = {p: {k: v + 0.1 for k, v in a.items()} for p, a in lora.init().items()}
        >>> merged, x = lora.merge(adapter), torch.randn(3, 4)
        >>> torch.allclose(torch.func.functional_call(model, merged, (x,)), lora(adapter, x), atol=1e-6)
        True
        >>> torch.allclose(lora.unmerge(merged, adapter)["0.weight"], model[0].weight, atol=1e-6)
        True
        """
        base = dict(self.model.named_parameters()) if params is None else dict(params)
        merged = dict(base)
        deltas, replaced = self.delta(adapter), self._replaced(adapter)
        for canonical, names in self._tied_groups(list(deltas) + list(replaced)).items():
            for name in names:  # spell out the twins: they keep W (see the module docstring)
                merged.setdefault(name, self._base(name, base))
        for name, d in deltas.items():
            w = self._base(name, base)
            merged[name] = (w + d).to(w.dtype)  # one rounding into the base dtype
        merged.update(replaced)
        for twin in self._slot_twins:  # a module shared under two paths has one slot: name it once
            merged.pop(twin, None)     # (torch's functional_call given both names restores the wrong tensor)
        return merged

    def unmerge(self, merged: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
        """Undo :meth:`merge`: ``W = merged − s·ΔW``; saved modules and biases from the model.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter = {p: {k: v + 0.1 for k, v in a.items()} for p, a in lora.init().items()}
        >>> params = lora.unmerge(lora.merge(adapter), adapter)
        >>> all(torch.allclose(params[n], p, atol=1e-6) for n, p in model.named_parameters())
        True
        """
        params = dict(merged)
        deltas, replaced = self.delta(adapter), self._replaced(adapter)
        for name, d in deltas.items():
            w = self._base(name, merged)
            params[name] = (w - d).to(w.dtype)
        for name in replaced:
            params[name] = self.model.get_parameter(name)
        for canonical, names in self._tied_groups(list(deltas) + list(replaced)).items():
            # back to the tied form: one entry, under named_parameters()' name
            present = [n for n in names if n in params]
            value = params[canonical] if canonical in params else params[present[0]]
            for name in names:
                params.pop(name, None)
            params[canonical] = value
        return params

    def _tied_groups(self, names) -> dict[str, list[str]]:
        """``{canonical name: all names of its tied group}`` for the tied groups among ``names``."""
        wanted = {self._alias.get(n, n) for n in names}
        groups: dict[str, list[str]] = {}
        for name, canonical in self._alias.items():
            if canonical in wanted and name not in self._slot_twins:  # twins of a shared module are not separate weights
                groups.setdefault(canonical, []).append(name)
        return {c: g for c, g in groups.items() if len(g) > 1}

    def _replaced(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        return {name: adapter[path][leaf] for name, path, leaf in self._replaced_names}

    # --- counting -----------------------------------------------------------------------------
    def num_parameters(self, adapter: Adapter | None = None) -> tuple[int, int]:
        """``(trainable, all)`` counted as PEFT does: saved modules count twice in ``all``.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> lora.num_parameters()        # (2·4 + 8·2) + (2·8 + 2),  58 base + 42
        (42, 100)
        """
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

    def print_trainable_parameters(self, adapter: Adapter | None = None) -> None:
        """Print ``trainable params: T || all params: N || trainable%: P`` exactly as PEFT.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> lora.print_trainable_parameters()
        trainable params: 42 || all params: 100 || trainable%: 42.0000
        """
        trainable, total = self.num_parameters(adapter)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def __repr__(self):
        return f"LoRA({type(self.model).__name__}, r={self.config.r})\n{self.plan}"


#: dtype -> whether adapter leaves may have it (a dict lookup is the cheapest per-leaf test)
_FLOATS = {d: True for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}

_NO_RNN_BATCHING = re.compile(r"Batching rule not implemented for (aten::\w*(?:lstm|gru|rnn)\w*)")


def _rnn_vmap_error(model: nn.Module, paths: list[str], message: str) -> RuntimeError:
    """PyTorch's 'Batching rule not implemented for aten::lstm' said in funclora's terms."""
    op = _NO_RNN_BATCHING.search(message).group(1)
    kinds = sorted({type(model.get_submodule(p) if p != "<root>" else model).__name__ for p in paths})
    return RuntimeError(
        f"LoRA: torch.func.vmap cannot run this model: it contains {'/'.join(kinds)} at {paths}, and "
        f"PyTorch has no batching rule for {op} (nn.LSTM / nn.GRU / nn.RNN cannot be vmapped), so "
        "they cannot see a stacked adapter or a vmapped input. Run the adapters one at a time "
        "instead: [lora(fl.select(stacked, i), x) for i in range(n)], or lora.route(stacked, index, x) "
        "for one adapter per example; to batch many sequences, use the RNN's own batch dimension."
    )


class _LazyTarget(NamedTuple):
    """A target whose weight the forward replaces by a :class:`~funclora.lazy.LoraWeight`."""

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


def _builds_lora_weight(rule) -> bool:
    """Whether ``rule`` uses the built-in factored overlay (so ``_overlay`` may build it directly)."""
    return (isinstance(rule, _FactoredRule) and type(rule).overlay is _FactoredRule.overlay
            and type(rule)._parts is _FactoredRule._parts)


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


def _factor_dtype(base_dtype: torch.dtype, dtype) -> torch.dtype:
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
