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
import warnings
from types import MethodType

import torch
from torch import nn

from .core.config import LoraConfig
from .lora import LoRA
from .peft_folders import FolderMethods
from .peft_transformers import TransformersMethods, _Checkpointing, _specialised, _with_task_heads

__all__ = ["PeftModel", "get_peft_model"]


class _Node(nn.Module):
    """An empty module: the adapter's parameters hang on a tree of these, named like the model."""

    def forward(self):  # pragma: no cover - never called
        raise RuntimeError("funclora: adapter containers are not callable")


class PeftModel(FolderMethods, TransformersMethods, nn.Module):
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
        return self.lora.run(None, self.adapter, args, kwargs, self.training)

    def _view(self) -> nn.Module:
        """This call's view of the model: the adapter (or none, inside ``disable_adapter``), the
        façade's train/eval mode, its checkpointing, base weights loaded from a PEFT folder."""
        if self._disabled:
            return self.lora.bound.shadower.build({}, training=self.training)
        params = None
        if self._base_weights:
            params = {n: p.detach() for n, p in self._model.named_parameters()}
            params.update(self._base_weights)
        view = self.lora.bind(self.adapter, params=params, training=self.training)
        if self._checkpointing is not None and self.training:
            self._checkpointing.apply(view)  # every module of a view with a training flag is the view's own
        return view

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
        # copy, so the merged model equals the adapter's forward (see funclora.lora)
        untie = {n for group in self.lora.bound.tied_groups(merged).values()
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

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, targets={self.targeted_module_names}"


# Hub arguments of PEFT's from_pretrained / load_adapter: meaningless for a local folder.


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
