"""``LoRA``: the public functional object. Its bodies are short: the work is in the layers.

``fl.LoRA(model, config)`` binds the model and config once (:class:`funclora.core.bound.Bound`);
calls run :mod:`funclora.core.forward` (or :mod:`funclora.distributed.fsdp` on an FSDP2-sharded
base), :meth:`LoRA.merge` / :meth:`LoRA.unmerge` / :meth:`LoRA.delta` run
:mod:`funclora.core.merge`, :meth:`LoRA.route` / :meth:`LoRA.combine` run :mod:`funclora.multi`.
The model is never changed, not even during a call.

Tied weights (a language model's input embedding and ``lm_head`` sharing one Parameter) are
treated as PEFT treats them: the base weight is shared, the adapter is not. A LoRA (or a
modules_to_save copy) on ``embed_tokens`` / ``wte`` changes only the embedding lookup, never the
tied head, and a LoRA on ``lm_head`` never reaches the embedding; an explicit params dict may
name a tied weight once, as ``named_parameters()`` does (see :mod:`funclora.core.merge` for how
merged params spell tied groups). PEFT's opt-in ``ensure_weight_tying=True`` is not implemented;
``LoraConfig`` rejects it.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import forward as _forward_mod
from .core import merge as _merge
from .core.bound import Adapter, Bound
from .core.config import LoraConfig
from .core.targeting import Plan
from .distributed.fsdp import fsdp_units, fully_shard_used, sharded_forward
from .multi.combine import combine
from .multi.route import route

__all__ = ["LoRA"]


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
        #: the model and config bound once: plan, shapes, caches (funclora.core.bound)
        self.bound = Bound(model, config)

    @property
    def model(self) -> nn.Module:
        """The model (read, never written)."""
        return self.bound.model

    @property
    def config(self) -> LoraConfig:
        """The :class:`~funclora.LoraConfig` given."""
        return self.bound.config

    @property
    def plan(self) -> Plan:
        """What is targeted, saved and trained (a printable :class:`~funclora.Plan`)."""
        return self.bound.plan

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
        return self.bound.shapes()

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
            parameters of each saved module, and ``bias`` for trained biases; with ``use_dora=True``
            also ``lora_magnitude_vector`` (PEFT's init ``‖W + s·BA‖``, one value per output channel).

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
        return self.bound.init(generator, dtype)

    def leaf_dtypes(self) -> dict[str, dict[str, torch.dtype]]:
        """``{path: {leaf: dtype}}`` that :meth:`init` gives (without allocating an adapter).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8).bfloat16(), torch.nn.Linear(8, 2).bfloat16())
        >>> fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["1"], r=2)).leaf_dtypes()
        {'0': {'lora_A': torch.float32, 'lora_B': torch.float32}, '1': {'weight': torch.bfloat16, 'bias': torch.bfloat16}}
        """
        return self.bound.leaf_dtypes()

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
        self.bound.check(adapter, batched)

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
        return self.run(None, adapter, args, kwargs)

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
        return self.run(params, adapter, args, kwargs)

    def run(self, params: dict[str, torch.Tensor] | None, adapter: Adapter, args: tuple = (),
            kwargs: dict | None = None, training: bool | None = None):
        """The forward with every argument explicit: ``apply`` with ``training`` forced (``None``: the
        model's own flags); what ``__call__``, ``apply``, ``route`` and the façade run.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> x = torch.randn(3, 4)
        >>> torch.equal(lora.run(None, lora.init(), (x,), training=False), model.eval()(x))
        True
        """
        if not torch._C._is_torch_function_enabled():
            raise RuntimeError(
                "LoRA: torch function handling is disabled here (DisableTorchFunctionSubclass or "
                "DisableTorchFunction), so the LoRA weights would silently act as the plain base "
                "weights. Call the LoRA forward outside that context.")
        if not self.bound.fits(adapter):
            self.bound.check(adapter)  # raises, saying what does not fit
        kwargs = {} if kwargs is None else kwargs
        if fully_shard_used():
            units = fsdp_units(self.model)
            if units:  # FSDP2-sharded base: the overlay goes onto each unit's all-gathered weights
                return sharded_forward(self.bound, params, adapter, args, kwargs, training, units)
        return _forward_mod.forward(self.bound, params, adapter, args, kwargs, training)

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
        if not self.bound.fits(adapter):
            self.bound.check(adapter)
        return _forward_mod.bind(self.bound, params, adapter, training)

    # --- many adapters (funclora/multi/route.py, funclora/multi/combine.py) --------------------------------
    def route(self, stacked: Adapter, index, *args, **kwargs):
        """Example ``i`` of the batch uses adapter ``index[i]`` of ``stacked`` (see :mod:`funclora.multi.route`).

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
        return route(self.bound, stacked, index, args, kwargs, call=self.run)

    def combine(self, adapters, weights, method: str = "svd", rank: int | None = None):
        """Mix adapters into one: ``(adapter, config)`` (see :mod:`funclora.multi.combine`).

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
        return combine(self.bound, adapters, weights, method=method, rank=rank)

    # --- merge --------------------------------------------------------------------------------
    def delta(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """``{param name: s·ΔW}`` for each adapted weight, keyed like :meth:`merge`'s params.

        Each ``ΔW`` has its parameter's shape (``(out, in)`` for a Linear, the kernel's shape for
        a conv). Saved modules and trained biases are not deltas: see :meth:`merge`. A DoRA
        target's update depends on its base weight: ``m ⊙ (W + s·BA)/‖W + s·BA‖ − W``.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> adapter = lora.init(generator=torch.Generator().manual_seed(0))
        >>> {name: tuple(d.shape) for name, d in lora.delta(adapter).items()}
        {'0.weight': (8, 4)}
        """
        return _merge.delta(self.bound, adapter)

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
        return _merge.merge(self.bound, adapter, params)

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
        return _merge.unmerge(self.bound, merged, adapter)

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
        return self.bound.num_parameters(adapter)

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


