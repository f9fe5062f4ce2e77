"""A PEFT-style façade: ``get_peft_model(model, config)`` returns an ``nn.Module``.

The seed guide's code runs with only the import changed. Unlike PEFT, the user's model is
never mutated: the façade holds the adapter as its only parameters and runs the model through
:class:`~funclora.LoRA`'s functional forward. This is the one stateful part of funclora.

What the façade shows to code written for PEFT models (transformers' ``Trainer``, TRL):

- its class is specialised per base-model class (``PeftModel[LlamaForCausalLM]``, a subclass of
  :class:`PeftModel`) whose ``forward`` carries the base model's signature, because ``Trainer``
  reads the forward signature from the *class* (``find_labels``, ``can_return_loss``) to keep the
  dataset's columns and find the label names;
- attributes the façade does not define come from the base model (``config``, ``loss_type``,
  ``main_input_name``, ``generation_config``, ...), as PEFT's ``__getattr__`` forwards them;
- ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` turn checkpointing on in
  the façade's own view of the model (the model's flags never change);
- a ``forward`` that a library sets on the façade instance (TRL's fused LM head, accelerate's
  autocast wrapper) runs with the call's view of the model as ``self``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import warnings
from types import MethodType

import torch
from torch import nn

from .apply import LoRA
from .config import LoraConfig
from .ops import stack
from .rules import Factor

__all__ = ["PeftModel", "get_peft_model"]

# PEFT's PeftModelFor<Task> classes add these heads to modules_to_save (peft/peft_model.py, 0.21.2);
# SEQ_CLS's are added by the plan itself (funclora.targeting), for the functional API too.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
_BASE = "__base__"  # PEFT's adapter name for "no adapter" in adapter_names=


class _Node(nn.Module):
    """An empty module: the adapter's parameters hang on a tree of these, named like the model."""

    def forward(self):  # pragma: no cover - never called
        raise RuntimeError("funclora: adapter containers are not callable")


class PeftModel(nn.Module):
    """``model`` with a LoRA adapter, as an ``nn.Module`` whose parameters are the adapter.

    ``parameters()`` yields exactly the trainable adapter tensors (named like
    ``seq.0.lora_A``), so ``torch.optim.AdamW(peft_model.parameters())`` trains the adapter.
    ``train()`` / ``eval()`` set the mode the model runs in for this façade's forward, on the
    call's own view of the model (:meth:`funclora.LoRA.bind`): the model's flags never change,
    and several façades over one model can run at once, from several threads. Move the base
    model to a device yourself: ``.to()`` here moves the adapter only.

    The instance belongs to a subclass made for the base model's class, whose ``forward`` has the
    base model's signature; attributes the façade lacks are read from the base model (as PEFT's
    ``__getattr__`` does). Both let transformers' ``Trainer`` treat it like a PEFT model.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> [n for n, _ in peft_model.named_parameters()]
        ['0.lora_A', '0.lora_B']
        >>> peft_model(torch.randn(3, 4)).shape
        torch.Size([3, 2])
        >>> type(peft_model).__name__, isinstance(peft_model, fl.PeftModel)
        ('PeftModel[Sequential]', True)
    """

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        if isinstance(model, nn.Module) and "_base_class" not in cls.__dict__:
            cls = _specialised(cls, type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: LoraConfig, adapter: dict | None = None, *,
                 adapter_name: str = "default", generator: torch.Generator | None = None,
                 is_trainable: bool = True, autocast_adapter_dtype: bool = True):
        super().__init__()
        config = _with_task_heads(model, config)
        lora = LoRA(model, config)
        object.__setattr__(self, "_model", model)
        self.lora = lora  # not an nn.Module: no parameters of the model are registered here
        self.adapter_name = adapter_name
        self.peft_config = {adapter_name: config}
        if adapter is None:
            adapter = lora.init(generator=generator, dtype=None if autocast_adapter_dtype else "base")
        else:
            lora.check(adapter)
        trainable = bool(is_trainable) and not config.inference_mode  # PEFT: inference_mode freezes the adapter
        self.adapters = _Node()
        self._leaves: list[tuple[str, str, str]] = []  # (path, leaf, parameter name)
        self._slots: list[tuple[str, str, dict, str]] = []  # (path, leaf, owning node's _parameters, key)
        for path, leaves in adapter.items():
            for leaf, tensor in leaves.items():
                name = f"{path}.{leaf}"
                node, key = _attach(self.adapters, name, nn.Parameter(tensor.detach().clone(),
                                                                       requires_grad=trainable))
                self._leaves.append((path, leaf, name))
                self._slots.append((path, leaf, node._parameters, key))
        self._disabled = False
        self._checkpointing: _Checkpointing | None = None
        self._base_weights: dict[str, torch.Tensor] = {}  # base weights a PEFT folder carried (embeddings)
        self.train(model.training)

    # nn.Module's named_parameters would prefix "adapters."; PEFT users expect plain names.
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.adapters.named_parameters(prefix, recurse, remove_duplicate)

    def named_children(self):
        """The adapter tree's top nodes, named as :meth:`named_parameters` names their parameters.

        (transformers' ``Trainer`` builds its weight-decay groups from ``named_children`` and matches
        them against ``named_parameters``: the two must agree.)
        """
        return self.adapters.named_children()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None or (name.startswith("__") and name.endswith("__")):
                raise
            try:
                return getattr(model, name)  # PEFT forwards unknown attributes to the base model too
            except AttributeError:
                raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}, and neither has "
                                     f"its base model ({type(model).__name__}).") from None

    def _get_name(self) -> str:
        # the base model's name, as PEFT's wrapped model reports it (Trainer's label smoothing picks the
        # causal-LM shift by it)
        return self._model._get_name()

    def __repr__(self) -> str:
        return "PeftModel" + super().__repr__()[len(self._get_name()):]

    @property
    def adapter(self) -> dict:
        """The adapter pytree ``{path: {leaf: Parameter}}`` (live parameters, not copies).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> {path: {leaf: tuple(t.shape) for leaf, t in leaves.items()} for path, leaves in peft_model.adapter.items()}
        {'0': {'lora_A': (2, 4), 'lora_B': (8, 2)}}
        """
        out: dict = {}
        for path, leaf, params, key in self._slots:  # the nodes' own dicts: current after .to() / load_state_dict
            out.setdefault(path, {})[leaf] = params[key]
        return out

    @property
    def base_model(self) -> nn.Module:
        """The user's model (never mutated).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> peft_model.base_model is model, type(model[0]).__name__
        (True, 'Linear')
        """
        return self._model

    def get_base_model(self) -> nn.Module:
        """The user's model (PEFT's method; same as :attr:`base_model`)."""
        return self._model

    @property
    def targeted_module_names(self) -> list[str]:
        """Module paths that carry LoRA (PEFT's attribute).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> peft_model.targeted_module_names
        ['0']
        """
        return self.lora.targeted_module_names

    @property
    def targeted_parameter_names(self) -> list[str]:
        """Parameter paths adapted through ``target_parameters`` (PEFT's attribute)."""
        return self.lora.targeted_parameter_names

    @property
    def active_adapter(self) -> str:
        """The adapter's name (PEFT's attribute; a façade holds one adapter)."""
        return self.adapter_name

    @property
    def active_adapters(self) -> list[str]:
        """``[adapter_name]`` (PEFT's attribute)."""
        return [self.adapter_name]

    # --- forward ------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        patch = self.__dict__.get("forward")
        if isinstance(patch, MethodType) and patch.__self__ is self:
            # a library replaced the forward of this instance with a function written for the model (TRL's
            # fused LM head reads self.base_model and self.get_output_embeddings(); accelerate wraps the
            # forward in autocast): it runs with the call's view of the model, which holds the adapter
            return patch.__func__(self._view(), *args, **kwargs)
        return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if not isinstance(self, PeftModel):  # a wrapped façade forward reached with a view (see __call__)
            return self.forward(*args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._routed(adapter_names, args, kwargs)
        if self._disabled or self._base_weights or (self._checkpointing is not None and self.training):
            return self._view()(*args, **kwargs)
        return self.lora._forward(None, self.adapter, args, kwargs, self.training)

    def _view(self) -> nn.Module:
        """This call's view of the model: the adapter (or none, inside ``disable_adapter``), the
        façade's train/eval mode, its checkpointing, base weights loaded from a PEFT folder."""
        if self._disabled:
            return self.lora._shadower.build({}, training=self.training)
        params = None
        if self._base_weights:
            params = {n: p.detach() for n, p in self._model.named_parameters()}
            params.update(self._base_weights)
        view = self.lora.bind(self.adapter, params=params, training=self.training)
        if self._checkpointing is not None and self.training:
            self._checkpointing.apply(view)  # every module of a view with a training flag is the view's own
        return view

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
        beams = kwargs.get("num_beams")
        index = self._route_index(adapter_names, beams if isinstance(beams, int) and beams > 1 else 1)
        stacked = self._base_and_adapter()
        lora = self.lora

        @functools.wraps(type(self._model).forward)
        def routed(module, *a, **k):
            return lora.route(stacked, index, *a, **k)

        view = self.lora._shadower.build({}, training=False, forwards={"": routed})
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
        """``fl.stack([no-op adapter, adapter])``: zero factors and the model's own saved modules at 0."""
        base = self.lora.init()
        adapter = self.adapter
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                if isinstance(self.lora._specs[path][leaf], Factor):
                    base[path][leaf] = torch.zeros_like(value)
                base[path][leaf] = base[path][leaf].to(device=value.device, dtype=value.dtype)
        return stack([base, {p: {k: v.detach() for k, v in ls.items()} for p, ls in adapter.items()}])

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context the forward is the base model's own.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> with torch.no_grad():
        ...     _ = peft_model.adapter["0"]["lora_B"].fill_(0.5)   # a non-trivial adapter
        >>> x = torch.randn(3, 4)
        >>> with peft_model.disable_adapter():
        ...     torch.equal(peft_model(x), model(x))
        True
        """
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False

    # --- checkpointing (transformers' switches, applied to the façade's views only) -------------
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

    # --- counting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` as PEFT counts them.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> peft_model.get_nb_trainable_parameters()     # 2·4 + 8·2 LoRA; 58 base
        (24, 82)
        """
        trainable, total = self.lora.num_parameters()
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return trainable - frozen, total

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

    def print_trainable_parameters(self) -> None:
        """``trainable params: T || all params: N || trainable%: P``, exactly as PEFT prints it.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> peft_model.print_trainable_parameters()
        trainable params: 24 || all params: 82 || trainable%: 29.2683
        """
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """A new model (a deep copy) with the adapter merged in; the user's model is untouched.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> with torch.no_grad():
        ...     _ = peft_model.adapter["0"]["lora_B"].fill_(0.5)
        >>> merged, x = peft_model.merge_and_unload(), torch.randn(3, 4)
        >>> torch.allclose(merged(x), peft_model(x), atol=1e-6), merged is model
        (True, False)
        """
        params = None
        if self._base_weights:
            params = {n: p.detach() for n, p in self._model.named_parameters()}
            params.update(self._base_weights)
        merged = self.lora.merge(self.adapter, params)
        new = copy.deepcopy(self._model)
        # tied groups that merge spelled out (an adapted embedding / lm_head) are untied in the
        # copy, so the merged model equals the adapter's forward (see funclora.apply)
        untie = {n for group in self.lora._tied_groups(merged).values()
                 if sum(n in merged for n in group) > 1 for n in group}
        for name, value in merged.items():
            if name in untie:
                path, _, leaf = name.rpartition(".")
                owner = new.get_submodule(path)
                old = getattr(owner, leaf)
                setattr(owner, leaf, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
            else:
                new.get_parameter(name).copy_(value)
        return new

    # --- files --------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        state_dict: dict | None = None, **kwargs) -> None:
        """Write PEFT's files (``adapter_model.safetensors``, ``adapter_config.json``); PEFT's arguments.

        Args:
            save_directory: the folder (``adapter_name`` other than ``"default"``: a subfolder, as PEFT).
            safe_serialization: must be ``True``: funclora writes safetensors only.
            selected_adapters: ``None`` or ``[adapter_name]`` (a façade holds one adapter).
            save_embedding_layers: PEFT's rule: ``"auto"`` saves the base weights of the input /
                output embedding when ``target_modules`` names ``embed_tokens`` / ``lm_head``, or when
                the vocabulary differs from the one in ``base_model_name_or_path``'s local
                ``config.json``; ``True`` always, ``False`` never.
            is_main_process: ``False`` writes nothing (other ranks of a distributed run).
            state_dict: values to write instead of the live ones, keyed like ``self.state_dict()``
                (what transformers' ``Trainer`` passes under DeepSpeed / FSDP).
            path_initial_model_for_weight_conversion: PiSSA / OLoRA conversion: must be ``None``.
            kwargs: PEFT passes them to ``push_to_hub``; accepted, unused (no Hub access here).

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     peft_model.save_pretrained(folder)
        ...     sorted(os.listdir(folder))
        ['adapter_config.json', 'adapter_model.safetensors']
        """
        from .io import save_adapter

        fn = "PeftModel.save_pretrained"
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")  # PEFT's message
        if not safe_serialization:
            raise ValueError(f"{fn}: safe_serialization=False asks for a pickled adapter_model.bin; funclora only "
                             "writes safetensors (PEFT reads them too). Leave safe_serialization=True.")
        if selected_adapters is not None and list(selected_adapters) != [self.adapter_name]:
            raise ValueError(f"You passed an invalid `selected_adapters` arguments, current supported adapter names "
                             f"are {[self.adapter_name]} - got {selected_adapters}.")
        if path_initial_model_for_weight_conversion is not None or kwargs.get("convert_pissa_to_lora") is not None:
            raise ValueError(f"{fn}: PiSSA / OLoRA / CorDA weight conversion is not in funclora (no such "
                             "initialisation); leave path_initial_model_for_weight_conversion=None.")
        if not is_main_process:
            return
        adapter = _detached(self.adapter)
        if state_dict is not None:
            adapter = self._from_state_dict(state_dict, adapter, fn)
        base = self._embedding_base_weights(save_embedding_layers)
        save_adapter(save_directory, adapter, lora=self.lora, adapter_name=self.adapter_name,
                     **({"base_weights": base} if base else {}))

    def _from_state_dict(self, state_dict: dict, adapter: dict, fn: str) -> dict:
        prefix = "adapters."
        out = {p: dict(ls) for p, ls in adapter.items()}
        for path, leaf, name in self._leaves:
            value = state_dict.get(prefix + name, state_dict.get(name))
            if value is None:
                raise KeyError(f"{fn}: state_dict has no {prefix + name!r}; pass the façade's own state_dict().")
            out[path][leaf] = value.detach()
        return out

    def _embedding_base_weights(self, save_embedding_layers) -> dict[str, torch.Tensor]:
        """``{parameter name: tensor}`` of the embedding layers PEFT would save beside the adapter."""
        if save_embedding_layers not in (True, False, "auto"):
            raise ValueError(f"PeftModel.save_pretrained: save_embedding_layers must be True, False or 'auto', "
                             f"got {save_embedding_layers!r}.")
        model = self._model
        if save_embedding_layers is False or not callable(getattr(model, "get_input_embeddings", None)):
            return {}
        names = {id(m): n for n, m in model.named_modules()}
        spec = self.lora.config.target_modules
        layers = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        if isinstance(spec, (list, tuple, set)):
            targeted = any(e in spec for e in ("embed_tokens", "lm_head"))
        else:
            targeted = isinstance(spec, str) and spec.lower() != "all-linear" and any(
                names.get(id(m), "").rsplit(".", 1)[-1] in ("embed_tokens", "lm_head")
                and names.get(id(m)) in self.targeted_module_names for m in layers)
        if save_embedding_layers == "auto" and not targeted and not self._vocabulary_resized():
            return dict(self._base_weights)  # what a PEFT folder brought along goes back into the files
        out = {}
        for layer in layers:
            path = names.get(id(layer))
            if path is None or path in self.lora.plan.saved:
                continue
            if targeted and not (path in self.targeted_module_names and isinstance(layer, (nn.Linear, nn.Embedding))):
                continue
            for leaf, p in layer.named_parameters(recurse=False):
                name = f"{path}.{leaf}" if path else leaf
                out[name] = self._base_weights.get(name, p).detach()
        return out

    def _vocabulary_resized(self) -> bool:
        """PEFT's "auto" check without the Hub: the vocabulary differs from the local base config's."""
        config = getattr(self._model, "config", None)
        source = self.lora.config.base_model_name_or_path or getattr(self._model, "name_or_path", None)
        if config is None or not source or not os.path.isfile(os.path.join(source, "config.json")):
            return False
        return getattr(config, "vocab_size", None) != getattr(type(config).from_pretrained(source), "vocab_size", None)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str | None = None,
                     is_trainable: bool | None = None, **kwargs) -> None:
        """Read an adapter folder into this façade's adapter, in place (PEFT's method, for its own name).

        The parameters keep their identity (an optimizer over them keeps its state), so
        transformers' ``Trainer`` resumes from a checkpoint with it (:mod:`funclora.trainer`).
        ``is_trainable`` ``None`` keeps the parameters' ``requires_grad``.

        Example:
        >>> import tempfile, torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with torch.no_grad():
        ...         _ = peft_model.adapter["0"]["lora_B"].fill_(0.5)
        ...     peft_model.save_pretrained(folder)
        ...     _ = peft_model.adapter["0"]["lora_B"].data.zero_()
        ...     peft_model.load_adapter(folder)
        >>> peft_model.adapter["0"]["lora_B"].unique().tolist()
        [0.5]
        """
        if adapter_name is not None and adapter_name != self.adapter_name:
            raise NotImplementedError(f"PeftModel.load_adapter: a façade holds one adapter ({self.adapter_name!r}); "
                                      f"to use {adapter_name!r} too, make another façade with "
                                      "fl.PeftModel.from_pretrained(model, path), or keep adapters as values "
                                      "(fl.load_adapter) and route between them (lora.route).")
        adapter, _, base = _read_folder(self._model, model_id, self.lora.config, "PeftModel.load_adapter",
                                        dict(kwargs))
        with torch.no_grad():
            for path, leaf, name in self._leaves:
                p = self.adapters.get_parameter(name)
                p.copy_(adapter[path][leaf])
                if is_trainable is not None:
                    p.requires_grad_(bool(is_trainable))
        self._base_weights = base

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict | None = None, **kwargs) -> "PeftModel":
        """Load a PEFT (or funclora) adapter folder onto ``model`` (which stays untouched); PEFT's arguments.

        ``is_trainable=False`` (PEFT's default): the adapter is frozen and the façade in eval mode.
        Base weights PEFT saved in the folder (the input / output embedding, ``save_embedding_layers``,
        e.g. after ``resize_token_embeddings``) are used by this façade's forward, as PEFT loads
        them into its model: the outputs equal PEFT's, and ``model`` keeps its own weights.

        Args:
            model, model_id: the base model; the local folder.
            adapter_name: the façade's adapter name (the folder's root, or ``subfolder=``).
            config: a :class:`LoraConfig` to use instead of the folder's (e.g. with custom rules).
            autocast_adapter_dtype: ``True``: the factors get ``init()``'s dtypes (fp32 on fp16 /
                bf16 bases), as PEFT; ``False``: the base weights' dtypes.
            ephemeral_gpu_offload, low_cpu_mem_usage: accepted, no effect (nothing is offloaded or
                created on the meta device here).
            key_mapping: must be ``None`` (no transformers checkpoint conversion here).
            kwargs: ``subfolder``; ``torch_device`` (PEFT's) or ``device``; ``dtype``, ``strict``
                (:func:`funclora.load_adapter`'s); Hub arguments (``revision``, ``token``,
                ``cache_dir``, ...) are accepted and unused: paths are local folders.

        Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> import tempfile
        >>> x = torch.randn(3, 4)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     peft_model.save_pretrained(folder)
        ...     loaded = fl.PeftModel.from_pretrained(model, folder)
        >>> torch.equal(loaded(x), peft_model(x)), loaded.targeted_module_names
        (True, ['0'])
        """
        if key_mapping is not None:
            raise ValueError("PeftModel.from_pretrained: key_mapping (transformers' checkpoint key conversion) is "
                             "not supported; load a folder in PEFT's own key format.")
        subfolder = kwargs.pop("subfolder", None)  # PEFT's way to pick a named adapter's folder
        folder = os.path.join(model_id, subfolder) if subfolder else model_id
        adapter, loaded_config, base = _read_folder(model, folder, config, "PeftModel.from_pretrained", kwargs)
        if loaded_config.inference_mode == bool(is_trainable):  # PEFT: inference_mode = not is_trainable
            loaded_config = copy.copy(loaded_config)
            loaded_config.inference_mode = not is_trainable
        if not autocast_adapter_dtype:
            base_dtypes = LoRA(model, loaded_config).init(dtype="base")
            adapter = {p: {k: v.to(base_dtypes[p][k].dtype) for k, v in ls.items()} for p, ls in adapter.items()}
        peft_model = cls(model, loaded_config, adapter, adapter_name=adapter_name, is_trainable=is_trainable)
        peft_model._base_weights = base
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, targets={self.targeted_module_names}"


# Hub arguments of PEFT's from_pretrained / load_adapter: meaningless for a local folder.
_HUB_KWARGS = ("revision", "token", "use_auth_token", "cache_dir", "force_download", "local_files_only",
               "proxies", "resume_download", "ephemeral_gpu_offload", "low_cpu_mem_usage", "torch_dtype_auto")


def _read_folder(model, folder, config, fn, kwargs) -> tuple[dict, LoraConfig, dict[str, torch.Tensor]]:
    """``(adapter, config, base weights)`` of an adapter folder for ``model``."""
    from .io import load_adapter, read_base_weights

    for name in _HUB_KWARGS:
        kwargs.pop(name, None)
    if "torch_device" in kwargs:
        kwargs.setdefault("device", kwargs.pop("torch_device"))
    allowed = {"dtype", "device", "strict"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword arguments {unknown} (funclora takes subfolder, device / "
                        f"torch_device, dtype, strict, and PEFT's Hub arguments, unused here).")
    options = {k: v for k, v in kwargs.items() if k in allowed}
    if config is None:
        from .io import read_config

        config = read_config(folder)
    config = _with_task_heads(model, config)   # a PEFT file lists every task head, present or not
    with warnings.catch_warnings():  # load_adapter's note on base weights: this façade applies them
        warnings.filterwarnings("ignore", message=r".*also holds base weights", category=UserWarning)
        adapter, loaded = load_adapter(folder, config=config, model=model, **options)
    base = read_base_weights(folder, model=model, config=loaded, device=options.get("device"))
    return adapter, loaded, base


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


_SPECIALISED: dict[tuple[type, type], type] = {}


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


def _detached(adapter: dict) -> dict:
    return {p: {leaf: t.detach() for leaf, t in leaves.items()} for p, leaves in adapter.items()}


def _attach(root: nn.Module, name: str, param: nn.Parameter) -> tuple[nn.Module, str]:
    *parents, last = name.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, _Node())
        node = node._modules[part]
    node.register_parameter(last, param)
    return node, last


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False, *, generator: torch.Generator | None = None) -> PeftModel:
    """PEFT's ``get_peft_model``: a :class:`PeftModel` façade; ``model`` is not mutated.

    PEFT's arguments: ``autocast_adapter_dtype=False`` gives the factors the base weights' dtype
    (default: fp32 factors on fp16 / bf16 bases); ``revision`` is recorded in the config;
    ``low_cpu_mem_usage`` has no effect (the adapter is small and made where the model lives);
    ``mixed=True`` (PEFT's mixed adapter types) is refused: funclora is LoRA only.
    ``peft_config.task_type`` adds PEFT's heads to ``modules_to_save`` (``SEQ_CLS`` / ``TOKEN_CLS``:
    ``classifier`` / ``score``; ``QUESTION_ANS``: ``qa_outputs``); ``inference_mode=True`` freezes
    the adapter.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 2))
        >>> fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"])).print_trainable_parameters()
        trainable params: 400 || all params: 1,092 || trainable%: 36.6300
    """
    if mixed:
        raise ValueError("get_peft_model: mixed=True builds PEFT's PeftMixedModel (adapters of several types); "
                         "funclora is LoRA only. Leave mixed=False.")
    if revision is not None and revision != peft_config.revision:
        if peft_config.revision is not None:
            warnings.warn(f"peft config has already set base model revision to {peft_config.revision}, overwriting "
                          f"with revision {revision}", UserWarning, stacklevel=2)  # PEFT's warning
        peft_config = copy.copy(peft_config)
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name=adapter_name, generator=generator,
                     autocast_adapter_dtype=autocast_adapter_dtype)
