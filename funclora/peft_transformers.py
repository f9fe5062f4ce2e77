"""What transformers' ``Trainer``, ``generate`` and TRL need from the façade, as a mixin of
:class:`funclora.PeftModel`: the per-base-class subclass whose ``forward`` has the base model's
signature, PEFT's task heads, activation checkpointing on each call's view, ``generate`` with
PEFT's ``adapter_names=`` (mixed batches, routed at every step), and transformers' counts and tags.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn

from .core.config import LoraConfig
from .core.pytree import stack
from .core.rules import Factor
from .multi.route import unroutable_targets

__all__ = ["TransformersMethods"]

_SPECIALISED: dict[tuple[type, type], type] = {}

_BASE = "__base__"  # PEFT's adapter name for "no adapter" in adapter_names=


# PEFT's PeftModelFor<Task> classes add these heads to modules_to_save (peft/peft_model.py, 0.21.2);
# SEQ_CLS's are added by the plan itself (funclora.targeting), for the functional API too.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


class _Checkpointing:
    """transformers' activation checkpointing, set on a view's modules per call (never on the model)."""

    def __init__(self, model: nn.Module, kwargs: dict | None, every_n_layers: int, offload: bool):
        from torch.utils.checkpoint import checkpoint

        kwargs = dict(kwargs) if kwargs else {"use_reentrant": False}  # transformers' default
        reentrant = kwargs.get("use_reentrant", True)

        def run(function, *args, **kw):
            if reentrant:  # reentrant checkpointing needs an input that requires grad to reach the adapter
                args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                             and not a.requires_grad and torch.is_grad_enabled() else a for a in args)
            if offload:
                with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
                    return checkpoint(function, *args, **kwargs, **kw)
            return checkpoint(function, *args, **kwargs, **kw)

        self.function = run
        self.every_n_layers = every_n_layers
        self.old_format = "value" in inspect.signature(model._set_gradient_checkpointing).parameters

    def apply(self, view: nn.Module) -> None:
        if self.old_format:  # models from before transformers 4.35 (remote code)
            view.apply(functools.partial(view._set_gradient_checkpointing, value=True))
        else:
            view._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=self.function,
                                             every_n_layers=self.every_n_layers)


def _specialised(cls: type, base_class: type) -> type:
    """``cls`` for façades over ``base_class`` models: its ``forward`` has the base forward's signature."""
    key = (cls, base_class)
    sub = _SPECIALISED.get(key)
    if sub is None:
        plain = cls.forward

        @functools.wraps(plain)
        def forward(self, *args, **kwargs):
            return plain(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_class.forward)
        except (TypeError, ValueError):  # a builtin or odd forward: keep (*args, **kwargs)
            pass
        name = f"{cls.__name__}[{base_class.__name__}]"
        sub = type(cls)(name, (cls,), {"forward": forward, "_base_class": base_class, "__module__": cls.__module__,
                                       "__qualname__": name, "__doc__": cls.__doc__})
        _SPECIALISED[key] = sub
    return sub


def _with_task_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with the heads PEFT's task classes put in ``modules_to_save``, as far as the model has them.

    ``TOKEN_CLS`` / ``QUESTION_ANS`` add ``classifier`` / ``score`` / ``qa_outputs`` (``SEQ_CLS``'s are
    added by the plan itself, see funclora.targeting); head names the model lacks are dropped
    (PEFT ignores them silently; its files list them all). A copy when anything changes: the
    user's config is not changed (PEFT extends its list in place).
    """
    heads = _TASK_HEADS.get(getattr(config, "task_type", None), ())
    if not heads:
        return config
    names = [n for n, _ in model.named_modules()]
    present = {h for h in heads if any(n == h or n.endswith("." + h) for n in names)}
    current = list(config.modules_to_save or [])
    kept = [m for m in current if m not in heads or m in present]
    if config.task_type != "SEQ_CLS":
        kept += [h for h in heads if h in present and h not in kept]
    if kept == current:
        return config
    out = copy.copy(config)
    out._custom_modules = dict(config._custom_modules)
    out.modules_to_save = kept or None
    return out


class TransformersMethods:
    """transformers' and TRL's methods of the façade (mixed into :class:`funclora.PeftModel`)."""

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's ``generate`` with the adapter applied at every step (PEFT's method).

        It runs on a view of the model bound to the adapter (:meth:`funclora.LoRA.bind`), so every
        forward ``generate`` makes sees the adapter and the model itself stays untouched.

        Args:
            adapter_names: PEFT's mixed batch: one name per example, the façade's ``adapter_name``
                or ``"__base__"`` (the model without the adapter); every forward of the loop routes
                each row to its adapter (:meth:`funclora.LoRA.route`). Eval mode only, as in PEFT.
        """
        if not callable(getattr(self._model, "generate", None)):
            raise AttributeError(f"PeftModel.generate: the base model ({type(self._model).__name__}) has no "
                                 "`generate` method; call the façade itself for a forward pass.")
        if adapter_names is None:
            return self._view().generate(*args, **kwargs)
        if getattr(getattr(self._model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError("PeftModel.generate: adapter_names= with an encoder-decoder model is not "
                                      "supported (its encoder runs outside the routed forward); generate each "
                                      "group of rows with its own façade.")
        if "forward" in vars(self._model):
            raise NotImplementedError(f"PeftModel.generate: adapter_names= cannot route a model whose instance has "
                                      f"its own `forward` ({type(self._model).__name__}, e.g. an accelerate hook).")
        whole = unroutable_targets(self.lora.bound)
        if whole:  # route would run the model once per adapter: the shared KV cache cannot follow
            raise NotImplementedError(
                f"PeftModel.generate: adapter_names= needs every target routed layer by layer, but {whole[:3]} "
                f"({type(self.lora.plan.targets[whole[0]].module).__name__}{', DoRA' if self.lora.config.use_dora else ''}) "
                "run the model once per adapter, which a shared KV cache cannot follow (PEFT refuses adapter_names "
                "with DoRA too). Generate each adapter's rows with its own call.")
        beams = kwargs.get("num_beams")
        index = self._route_index(adapter_names, beams if isinstance(beams, int) and beams > 1 else 1)
        stacked = self._base_and_adapter()
        lora = self.lora

        @functools.wraps(type(self._model).forward)
        def routed(module, *a, **k):
            return lora.route(stacked, index, *a, **k)

        view = self.lora.bound.shadower.build({}, training=False, forwards={"": routed})
        return view.generate(*args, **kwargs)

    def _routed(self, adapter_names, args, kwargs):
        return self.lora.route(self._base_and_adapter(), self._route_index(adapter_names, 1), *args, **kwargs)

    def _route_index(self, adapter_names, repeat: int) -> torch.Tensor:
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")  # PEFT's message
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        unknown = sorted({n for n in adapter_names if n not in (self.adapter_name, _BASE)})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        return torch.tensor([int(n == self.adapter_name) for n in adapter_names for _ in range(repeat)])

    def _base_and_adapter(self) -> dict:
        """``fl.stack([no-op adapter, adapter])``: zero factors (DoRA: the magnitude that makes the
        layer its base) and the model's own saved modules at 0."""
        base = self.lora.init()
        adapter = self.adapter
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                spec = self.lora.bound.specs[path][leaf]
                if isinstance(spec, Factor) and spec.role != "magnitude":
                    base[path][leaf] = torch.zeros_like(value)
            if "lora_magnitude_vector" in leaves:
                base[path]["lora_magnitude_vector"] = self.lora.bound.initial_magnitude(path, base[path])
            for leaf, value in leaves.items():
                base[path][leaf] = base[path][leaf].to(device=value.device, dtype=value.dtype)
        return stack([base, {p: {k: v.detach() for k, v in ls.items()} for p, ls in adapter.items()}])

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers' activation checkpointing, in the façade's training forwards only.

        The base model's own switch (``model.activation_checkpointing_enable``) would set flags on
        the user's modules; here they are set on each training call's view of the model, so the
        model stays as it was. ``Trainer(args=TrainingArguments(gradient_checkpointing=True))``
        calls this. Recomputed layers see the call's adapter (:mod:`funclora.shadow`).

        Args:
            activation_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint``
                (default ``{"use_reentrant": False}``, as transformers).
            every_n_layers: checkpoint every n-th decoder layer.
            offload: keep the saved activations in host memory.
        """
        if not getattr(self._model, "supports_gradient_checkpointing", False) or \
                not hasattr(self._model, "_set_gradient_checkpointing"):
            raise ValueError(f"{type(self._model).__name__} does not support activation checkpointing (it is "
                             "not a transformers model that supports it). Checkpoint inside your model with "
                             "torch.utils.checkpoint: funclora's recomputes see the call's adapter.")
        self._checkpointing = _Checkpointing(self._model, activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        """Turn the façade's activation checkpointing off."""
        self._checkpointing = None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers' (and PEFT's) older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Older name of :meth:`activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether the façade's training forwards checkpoint (transformers' attribute)."""
        return self._checkpointing is not None

    is_gradient_checkpointing = is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Accepted for PEFT / TRL code; nothing to do, and the model gets no hook.

        transformers hooks the input embedding so that reentrant checkpointing sees an input that
        requires grad; the façade's checkpointing makes the recomputed layers' inputs require grad
        itself (and non-reentrant checkpointing, the default, needs nothing).
        """

    def disable_input_require_grads(self) -> None:
        """Accepted for PEFT / TRL code; nothing to undo."""

    def add_model_tags(self, tags: list[str] | str) -> None:
        """transformers' model-card tags (``Trainer`` and TRL add theirs), kept on the façade, not the model."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        current = list(self.__dict__.get("model_tags") or getattr(self._model, "model_tags", None) or [])
        self.model_tags = current + [t for t in tags if t not in current]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count over PEFT's wrapped model: base parameters plus the adapter's.

        ``only_trainable``: the adapter's trainable leaves only (the base model is frozen here);
        ``exclude_embeddings``: without ``nn.Embedding`` weights, base or saved copies (Trainer's
        FLOP estimate uses this, as for a PEFT model).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2)).num_parameters()
        82
        """
        def is_embedding(path: str) -> bool:
            return path in self.lora.plan.saved and isinstance(self._model.get_submodule(path), nn.Embedding)

        count = sum(params[key].numel() for path, _, params, key in self._slots
                    if (params[key].requires_grad or not only_trainable)
                    and not (exclude_embeddings and is_embedding(path)))
        if only_trainable:
            return count
        if callable(getattr(type(self._model), "num_parameters", None)):
            return count + self._model.num_parameters(exclude_embeddings=exclude_embeddings)
        embeddings = {id(m.weight) for m in self._model.modules() if isinstance(m, nn.Embedding)}
        return count + sum(p.numel() for p in self._model.parameters()
                           if not (exclude_embeddings and id(p) in embeddings))
