"""A PEFT-style façade: ``get_peft_model(model, config)`` returns an ``nn.Module``.

The seed guide's code runs with only the import changed. Unlike PEFT, the user's model is
never mutated: the façade holds the adapter as its only parameters and runs the model through
:class:`~funclora.LoRA`'s functional forward. This is the one stateful part of funclora.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

from .core.config import LoraConfig
from .io import load_adapter, save_adapter
from .lora import LoRA

__all__ = ["PeftModel", "get_peft_model"]


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

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> peft_model = fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> [n for n, _ in peft_model.named_parameters()]
        ['0.lora_A', '0.lora_B']
        >>> peft_model(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter: dict | None = None, *,
                 adapter_name: str = "default", generator: torch.Generator | None = None,
                 is_trainable: bool = True):
        super().__init__()
        lora = LoRA(model, config)
        object.__setattr__(self, "_model", model)
        self.lora = lora  # not an nn.Module: no parameters of the model are registered here
        self.adapter_name = adapter_name
        self.peft_config = {adapter_name: config}
        if adapter is None:
            adapter = lora.init(generator=generator)
        else:
            lora.check(adapter)
        self.adapters = _Node()
        self._leaves: list[tuple[str, str, str]] = []  # (path, leaf, parameter name)
        for path, leaves in adapter.items():
            for leaf, tensor in leaves.items():
                name = f"{path}.{leaf}"
                _attach(self.adapters, name, nn.Parameter(tensor.detach().clone(), requires_grad=is_trainable))
                self._leaves.append((path, leaf, name))
        self._disabled = False
        self.train(model.training)

    # nn.Module's named_parameters would prefix "adapters."; PEFT users expect plain names.
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.adapters.named_parameters(prefix, recurse, remove_duplicate)

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
        for path, leaf, name in self._leaves:
            out.setdefault(path, {})[leaf] = self.adapters.get_parameter(name)
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

    def forward(self, *args, **kwargs):
        if self._disabled:
            return self.lora.bound.shadower.build({}, training=self.training)(*args, **kwargs)
        return self.lora.run(None, self.adapter, args, kwargs, self.training)

    def generate(self, *args, **kwargs):
        """The base model's ``generate`` with the adapter applied at every step (PEFT's method).

        It runs on a view of the model bound to the adapter (:meth:`funclora.LoRA.bind`), so every
        forward ``generate`` makes sees the adapter and the model itself stays untouched.
        """
        if not callable(getattr(self._model, "generate", None)):
            raise AttributeError(f"PeftModel.generate: the base model ({type(self._model).__name__}) has no "
                                 "`generate` method; call the façade itself for a forward pass.")
        if self._disabled:
            bound = self.lora.bound.shadower.build({}, training=self.training)
        else:
            bound = self.lora.bind(self.adapter, training=self.training)
        return bound.generate(*args, **kwargs)

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
        merged = self.lora.merge(self.adapter)
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

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Write PEFT's files (``adapter_model.safetensors``, ``adapter_config.json``).

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
        save_adapter(path, _detached(self.adapter), lora=self.lora, adapter_name=self.adapter_name, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, config: LoraConfig | None = None, *,
                        adapter_name: str = "default", is_trainable: bool = False, **kwargs) -> "PeftModel":
        """Load a PEFT (or funclora) adapter folder onto ``model`` (which stays untouched).

        ``is_trainable=False`` (PEFT's default): the adapter is frozen and the façade in eval mode.

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
        subfolder = kwargs.pop("subfolder", None)  # PEFT's way to pick a named adapter's folder
        folder = os.path.join(path, subfolder) if subfolder else path
        adapter, loaded_config = load_adapter(folder, config=config, model=model, **kwargs)
        peft_model = cls(model, loaded_config, adapter, adapter_name=adapter_name,
                         is_trainable=is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def extra_repr(self) -> str:
        return f"model={type(self._model).__name__}, targets={self.targeted_module_names}"


def _detached(adapter: dict) -> dict:
    return {p: {leaf: t.detach() for leaf, t in leaves.items()} for p, leaves in adapter.items()}


def _attach(root: nn.Module, name: str, param: nn.Parameter) -> None:
    *parents, last = name.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, _Node())
        node = node._modules[part]
    node.register_parameter(last, param)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", *,
                   generator: torch.Generator | None = None) -> PeftModel:
    """PEFT's ``get_peft_model``: a :class:`PeftModel` façade; ``model`` is not mutated.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 2))
        >>> fl.get_peft_model(model, fl.LoraConfig(target_modules=["0"])).print_trainable_parameters()
        trainable params: 400 || all params: 1,092 || trainable%: 36.6300
    """
    return PeftModel(model, peft_config, adapter_name=adapter_name, generator=generator)
