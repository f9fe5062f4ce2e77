"""Reading adapter folders written by funclora or PEFT (see :mod:`funclora.io` for the layout)."""

from __future__ import annotations

import os
import warnings

import torch

from .. import _files as files
from ..core.bound import Adapter, Bound
from ..core.config import LoraConfig, read_config_file, read_config_folder
from ..core.registry import rules_in_metadata, with_rules
from . import layout

__all__ = ["load_adapter", "load_adapter_and_base_weights", "load_adapters", "read_config", "read_base_weights"]


def read_config(folder: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter folder (``LoraConfig.from_pretrained``).

    Custom rules recorded in the folder's safetensors metadata are registered on the config
    when they can be imported; others must be registered by hand (``config.register_custom_module``).
    """
    return read_config_folder(folder, "LoraConfig.from_pretrained")


def load_adapter(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                 config: LoraConfig | None = None, adapter_name: str | None = None,
                 dtype: torch.dtype | None = None, device=None, strict: bool = True) -> tuple[Adapter, LoraConfig]:
    """Read an adapter folder written by funclora or PEFT: ``(adapter, config)``.

    Args:
        path: the folder. ``adapter_name`` ``None`` / ``"default"`` reads its root, any other name
            the subfolder PEFT wrote for that adapter.
        model: check the keys and shapes against ``fl.LoRA(model, config)`` and return the pytree
            exactly as its ``init()`` structures it. Without a model the pytree is parsed from the
            key names and the config: paths come in file order, and a module with several
            ``target_parameters`` cannot be read (their nesting order needs the model).
        config: use this config instead of the folder's ``adapter_config.json`` (e.g. one with
            custom rules registered).
        dtype, device: convert floating-point leaves / move every leaf. With ``model`` and no
            ``dtype``, every leaf gets the dtype ``fl.LoRA(model, config).init()`` gives it, as
            PEFT copies a file into its own LoRA parameters (``autocast_adapter_dtype=True``): an
            fp16 / bf16 / fp64 folder read onto an fp32 model gives fp32 factors and saved modules,
            and the outputs equal PEFT's. Pass ``dtype=`` to choose the factors' dtype instead.
        strict: missing keys raise (``False``: warn and fill them with a fresh ``init``);
            unexpected keys raise (``False``: ignored).

    Returns:
        ``({path: {leaf: Tensor}}, LoraConfig)``; the config has the file's custom rules
        registered when they can be imported.

    Raises:
        FileNotFoundError: no such folder or file. AdapterFileError: a file is not valid
        safetensors / JSON or not a LoRA config. AdapterMismatchError: keys or shapes do not fit.

    Example:
        >>> import tempfile, torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fl.save_adapter(folder, lora.init(), lora=lora)
        ...     adapter, config = fl.load_adapter(folder, model=model)
        >>> {path: {leaf: tuple(t.shape) for leaf, t in leaves.items()} for path, leaves in adapter.items()}
        {'0': {'lora_A': (2, 4), 'lora_B': (8, 2)}, '2': {'weight': (2, 8), 'bias': (2,)}}
        >>> config.target_modules, config.modules_to_save
        (['0'], ['2'])
    """
    adapter, config, _ = _load(path, model, config, adapter_name, dtype, device, strict, "load_adapter", warn=True)
    return adapter, config


def load_adapter_and_base_weights(path: str | os.PathLike, *, model: torch.nn.Module, config: LoraConfig | None = None,
                                  adapter_name: str | None = None, dtype: torch.dtype | None = None, device=None,
                                  strict: bool = True) -> tuple[Adapter, LoraConfig, dict[str, torch.Tensor]]:
    """:func:`load_adapter` plus the base weights PEFT saved beside the adapter, from one read of the folder.

    Returns ``(adapter, config, {parameter name: Tensor})``: the third as :func:`read_base_weights`
    gives it (the model's dtypes; empty when the folder has none). What
    :meth:`funclora.PeftModel.from_pretrained` uses.
    """
    return _load(path, model, config, adapter_name, dtype, device, strict, "load_adapter", warn=False)


def _load(path, model, config, adapter_name, dtype, device, strict, fn, *, warn):
    """``(adapter, config, base weights)``; ``warn``: say when the folder's base weights differ from the model's."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{fn}: `dtype` must be a torch.dtype or None, got {dtype!r}.")
    folder = files.adapter_folder(path, adapter_name, fn)
    if config is None:
        config = read_config_file(folder, fn)
    elif not isinstance(config, LoraConfig):
        raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig, got {type(config).__name__}.")
    file = os.path.join(folder, files.WEIGHTS_NAME)
    tensors, meta = files.read_weights(folder, fn)
    config = with_rules(config, rules_in_metadata(meta, file, fn), required=model is not None, file=file, fn=fn)
    stripped = layout.strip_prefix(tensors)
    base: dict[str, torch.Tensor] = {}
    if model is None:
        adapter = layout.parse_keys(stripped, config, file, strict, fn)
    else:
        try:
            bound = Bound(model, config)
        except ValueError as e:
            raise type(e)(f"{fn}: the config of {folder!r} does not fit the model: {e}") from None
        base = _split_base_weights(stripped, bound, file, fn, warn=warn)
        base = {name: t.to(device=model.get_parameter(name).device if device is None else device,
                           dtype=model.get_parameter(name).dtype) for name, t in base.items()}
        adapter = layout.match_keys(stripped, bound, file, strict, fn)
        if dtype is None:  # as PEFT: the file's values land in leaves of the dtypes init() gives
            want = bound.leaf_dtypes()
            adapter = {p: {leaf: t.to(want[p][leaf]) if t.is_floating_point() else t for leaf, t in leaves.items()}
                       for p, leaves in adapter.items()}
    if dtype is not None or device is not None:
        adapter = {p: {leaf: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
                       for leaf, t in leaves.items()} for p, leaves in adapter.items()}
    return adapter, config, base


def _split_base_weights(stripped: dict, bound: Bound, file: str, fn: str, *, warn: bool) -> dict[str, torch.Tensor]:
    """Take PEFT's saved base weights out of ``stripped`` (in place): ``{parameter name: tensor}``.

    The adapter does not hold them; when they differ from the model's own, a warning says where
    they are used (PEFT loads them into its model).
    """
    keys = layout.base_weight_keys(bound)
    found = {keys[k]: stripped.pop(k) for k in list(stripped) if k in keys}
    differ = []
    for name, value in found.items():
        own = bound.model.get_parameter(name)
        if own.shape != value.shape or not torch.equal(own.detach().cpu(), value.to(own.dtype)):
            differ.append(name)
    if differ and warn:
        warnings.warn(f"{fn}: {file!r} also holds base weights of the model ({differ}: PEFT's save_embedding_layers, "
                      "e.g. after resize_token_embeddings) that differ from the model's own; PEFT's model uses the "
                      "file's. The adapter returned here does not carry them: fl.PeftModel.from_pretrained applies "
                      "them, or pass them as params (funclora.io.read_base_weights) to lora.apply.",
                      UserWarning, stacklevel=4)
    return found


def read_base_weights(path: str | os.PathLike, *, model: torch.nn.Module, config: LoraConfig | None = None,
                      adapter_name: str | None = None, device=None) -> dict[str, torch.Tensor]:
    """The base weights a PEFT folder carries beside its adapter: ``{parameter name: Tensor}``.

    PEFT's ``save_pretrained(save_embedding_layers=...)`` writes the model's input / output
    embedding weights too (always when ``target_modules`` names ``embed_tokens`` / ``lm_head``, and
    after ``resize_token_embeddings``), and its ``from_pretrained`` loads them into the model. To get
    PEFT's outputs, run with them: ``lora.apply({**dict(model.named_parameters()), **base}, adapter, x)``
    (:meth:`funclora.PeftModel.from_pretrained` does this for you). Empty when the folder has none.

    Example:
        >>> import tempfile, torch, funclora as fl
        >>> from funclora.io import read_base_weights
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fl.save_adapter(folder, lora.init(), lora=lora)
        ...     read_base_weights(folder, model=model)       # a model without embeddings: nothing
        {}
    """
    fn = "read_base_weights"
    folder = files.adapter_folder(path, adapter_name, fn)
    if config is None:
        config = read_config_file(folder, fn)
    file = os.path.join(folder, files.WEIGHTS_NAME)
    tensors, meta = files.read_weights(folder, fn)
    config = with_rules(config, rules_in_metadata(meta, file, fn), required=True, file=file, fn=fn)
    keys = layout.base_weight_keys(Bound(model, config))
    stripped = layout.strip_prefix(tensors)
    out = {}
    for key, name in keys.items():
        if key in stripped:
            own = model.get_parameter(name)
            out[name] = stripped[key].to(device=own.device if device is None else device, dtype=own.dtype)
    return out


def load_adapters(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                  dtype: torch.dtype | None = None, device=None,
                  strict: bool = True) -> tuple[dict[str, Adapter], dict[str, LoraConfig]]:
    """Every adapter of a folder in PEFT's layout: ``({name: adapter}, {name: config})``.

    ``"default"`` is the adapter at the root (if any), other names are the subfolders holding
    an ``adapter_config.json``. The inverse of ``save_adapter(path, {name: adapter}, {name: config})``.

    Example:
        >>> import tempfile, torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> config = fl.LoraConfig(target_modules=["0"], r=2)
        >>> lora = fl.LoRA(model, config)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fl.save_adapter(folder, {"default": lora.init(), "french": lora.init()},
        ...                     {"default": config, "french": config}, model=model)
        ...     adapters, configs = fl.load_adapters(folder, model=model)
        >>> sorted(adapters), configs["french"].r
        (['default', 'french'], 2)
    """
    fn = "load_adapters"
    folder = files.existing_folder(path, fn)
    names = ([files.DEFAULT] if os.path.exists(os.path.join(folder, files.CONFIG_NAME)) else []) + \
        [n for n in files.named_adapters(folder) if n != files.DEFAULT]
    if not names:
        raise FileNotFoundError(f"{fn}: {folder!r} holds no adapter ({files.CONFIG_NAME} at its root or in a "
                                "subfolder).")
    adapters, configs = {}, {}
    for name in names:
        adapters[name], configs[name] = load_adapter(folder, model=model, adapter_name=name, dtype=dtype,
                                                     device=device, strict=strict)
    return adapters, configs
