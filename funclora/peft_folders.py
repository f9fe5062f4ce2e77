"""PEFT's adapter folders for the façade, as a mixin of :class:`funclora.PeftModel`:
``save_pretrained``, ``load_adapter``, ``from_pretrained``, and the embedding base weights PEFT
saves beside an adapter (``save_embedding_layers``).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .core.config import LoraConfig
from .io import load_adapter_and_base_weights, read_config, save_adapter
from .lora import LoRA
from .peft_transformers import _with_task_heads

__all__ = ["FolderMethods"]


def _detached(adapter: dict) -> dict:
    return {p: {leaf: t.detach() for leaf, t in leaves.items()} for p, leaves in adapter.items()}


_HUB_KWARGS = ("revision", "token", "use_auth_token", "cache_dir", "force_download", "local_files_only",
               "proxies", "resume_download", "ephemeral_gpu_offload", "low_cpu_mem_usage", "torch_dtype_auto")


def _read_folder(model, folder, config, fn, kwargs) -> tuple[dict, LoraConfig, dict[str, torch.Tensor]]:
    """``(adapter, config, base weights)`` of an adapter folder for ``model``."""
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
        config = read_config(folder)
    config = _with_task_heads(model, config)   # a PEFT file lists every task head, present or not
    return load_adapter_and_base_weights(folder, config=config, model=model, **options)  # this façade applies them


class FolderMethods:
    """The façade's PEFT folder methods (mixed into :class:`funclora.PeftModel`)."""

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
                        low_cpu_mem_usage: bool = False, key_mapping: dict | None = None, **kwargs):
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
