"""Adapter files in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

A folder written by :func:`save_adapter` loads in PEFT (``PeftModel.from_pretrained(model, path)``)
and a folder written by PEFT loads here. The adapter pytree *is* PEFT's state dict in nested
form; a file key is ``"base_model.model." + <PEFT's wrapped path> + <leaf suffix>``:

==============================  ===============================================================
adapter entry                   file key (after ``base_model.model.``)
==============================  ===============================================================
``seq.0`` / ``lora_A``           ``seq.0.lora_A.weight`` (Linear, Conv, Conv1D)
``emb`` / ``lora_embedding_A``   ``emb.lora_embedding_A`` (no ``.weight``)
``mha`` / ``out_proj.lora_A``    ``mha.base_layer.out_proj.lora_A.weight``
``seq.4`` / ``weight``           ``seq.4.weight`` (modules_to_save)
``fc`` / ``bias``                ``fc.base_layer.bias`` if ``fc`` carries LoRA, else ``fc.bias``
``raw.w1`` / ``lora_A``          ``raw.lora_A.weight``; PEFT nests one wrapper per targeted
                                 parameter of a module in the module's parameter registration
                                 order (first = innermost), so with ``raw.w2`` registered
                                 before ``raw.w1``: ``raw.base_layer.lora_A.weight`` is ``w2``'s
==============================  ===============================================================

What needs the model (``model=`` or ``lora=``), when saving and loading: the nesting order of
several ``target_parameters`` on one module; custom rules (their leaves and ``file_key``);
shape checks. When saving also: the explicit target list written for ``"all-linear"`` /
``None``, per-module ``rank_pattern`` / ``alpha_pattern`` entries (anchored, ``"^seq\\.0$"``, so
PEFT's sorted JSON cannot change which pattern wins), ``fan_in_fan_out`` for transformers
``Conv1D`` targets, ``auto_mapping``. Without a model the layout comes from the leaf names and
the config (a path is a ``target_parameters`` entry if the config's list matches it), pattern
dicts are written in their insertion order, and a loaded pytree lists its paths in natural
order of the file keys rather than the model's ``named_modules`` order.

Custom rules are recorded by name (``"module:QualName"`` of the module type and the rule class)
in the safetensors metadata (``"funclora"`` entry; ``adapter_config.json`` stays PEFT's, since PEFT
warns on unknown keys). Loading re-registers a recorded rule when its module is already imported
(a file never makes funclora import code) and otherwise names the rule to register.

Several adapters: ``save_adapter(path, {name: adapter}, {name: config})`` and
:func:`load_adapters` use PEFT's layout (``"default"`` at the root, others in subfolders).

Writes are atomic (see :mod:`funclora._io_files`). Only safetensors and JSON are ever read,
never pickle (PEFT's ``adapter_model.bin`` is refused with a conversion hint).

PEFT-side limits (PEFT 0.21.2): ``fan_in_fan_out`` is one flag per config, so PEFT cannot load
an adapter that targets a transformers ``Conv1D`` together with an ``nn.MultiheadAttention``
(its out_proj delta gets transposed) or ``target_parameters`` (ParamWrapper refuses the flag);
PEFT applies an MHA's out_proj delta twice (PR #3774); its ``modules_to_save`` matching by plain
``endswith`` (#1917) can expect modules funclora does not save. funclora reads such files fine.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping

import torch

from . import _io_files as files
from . import _io_layout as layout
from .apply import LoRA
from .config import LoraConfig
from .errors import AdapterFileError, AdapterMismatchError, UnsupportedModuleError
from .ops import checked_leaves
from .rules import _BUILTIN, _USER, ParameterRule, Rule
from .targeting import _list_match, _pattern_value

__all__ = ["save_adapter", "load_adapter", "load_adapters", "read_config", "read_base_weights"]

Adapter = dict  # {path: {leaf: Tensor}}


def save_adapter(path: str | os.PathLike, adapter: Adapter, config: LoraConfig | Mapping | None = None, *,
                 model: torch.nn.Module | None = None, lora: LoRA | None = None,
                 adapter_name: str = files.DEFAULT, base_weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``adapter`` as PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``.

    Args:
        path: the folder (created if needed). ``adapter_name="default"`` writes into it, any other
            name into ``path/<adapter_name>/`` (PEFT's layout).
        adapter: ``{path: {leaf: Tensor}}`` as :meth:`LoRA.init` makes it; or, for several
            adapters, ``{name: adapter}`` with ``config`` a ``{name: LoraConfig}`` dict (the
            ``"default"`` adapter goes to the root, the others to subfolders).
        config: the :class:`LoraConfig` (may be omitted when ``lora`` is given).
        model, lora: the model the adapter is for (or its :class:`LoRA`). Recommended: shapes are
            checked, and the file gets the resolved target list, per-module ranks and the nesting
            of several ``target_parameters`` on one module (see the module docstring).
        base_weights: ``{parameter name: Tensor}`` of the model's input / output embedding to write
            beside the adapter, at PEFT's keys (PEFT's ``save_embedding_layers``); needs ``model`` or
            ``lora``. See :func:`read_base_weights`.

    All files are written atomically: on any error the folder keeps its previous files,
    byte-identical, and no temporary file remains.

    Example:
        >>> import tempfile, torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
        >>> adapter = lora.init(generator=torch.Generator().manual_seed(0))
        >>> folder = tempfile.mkdtemp()
        >>> fl.save_adapter(folder, adapter, lora=lora)
        >>> loaded, config = fl.load_adapter(folder, model=model)
        >>> torch.equal(loaded["0"]["lora_A"], adapter["0"]["lora_A"]), config.r
        (True, 2)
    """
    fn = "save_adapter"
    if isinstance(config, Mapping) and not all(isinstance(c, LoraConfig) for c in config.values()):
        raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig (or, for several adapters, a dict "
                        f"{{name: LoraConfig}}), got a {type(config).__name__} of other values (a config's "
                        "to_dict()?): pass the LoraConfig itself, or LoraConfig.from_dict(d).")
    if isinstance(config, Mapping):
        if lora is not None:
            raise TypeError(f"{fn}: with several adapters pass model=, not lora= (one LoRA has one config).")
        if not isinstance(adapter, Mapping) or set(adapter) != set(config):
            names = sorted(adapter) if isinstance(adapter, Mapping) else type(adapter).__name__
            raise TypeError(f"{fn}: several adapters need `adapter` and `config` as dicts with the same names; "
                            f"got adapters {names} and configs {sorted(config)}.")
        if base_weights:
            raise TypeError(f"{fn}: base_weights= goes with one adapter, not several.")
        jobs = [(files.subfolder(path, name, fn), adapter[name], config[name], None) for name in config]
    else:
        jobs = [(files.subfolder(path, adapter_name, fn), adapter, config, lora)]
    prepared = [_prepare(folder, a, c, model, lo, fn, base_weights) for folder, a, c, lo in jobs]
    writes = files.AtomicWrites()
    try:
        for folder, tensors, metadata, text in prepared:
            writes.makedirs(folder)
            writes.stage(os.path.join(folder, files.WEIGHTS_NAME),
                         lambda f, t=tensors, m=metadata: files.write_safetensors(f, t, m))
            writes.stage(os.path.join(folder, files.CONFIG_NAME), lambda f, s=text: f.write(s.encode("utf-8")))
        writes.commit()
    finally:
        writes.cleanup()


def _prepare(folder, adapter, config, model, lora, fn, base_weights=None):
    """Everything to write for one adapter, validated before any file is touched."""
    if lora is None and model is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig, got {type(config).__name__}.")
        lora = LoRA(model, config)
    if lora is not None:
        if config is not None and config is not lora.config:
            raise TypeError(f"{fn}: pass either lora= or config=, not both (lora.config is the config).")
        if model is not None and model is not lora.model:
            raise TypeError(f"{fn}: `model` is not the model of `lora`.")
        config = lora.config
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig, got {type(config).__name__}.")
    _check_pytree(adapter, fn)
    if lora is not None:
        try:
            lora.check(adapter)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"{fn}: {str(e).removeprefix('LoRA: ')}") from None
        targets = layout.targets_from_lora(lora)
    else:
        targets = layout.targets_from_names(adapter, config, fn)
        _check_ranks(adapter, targets, config, fn)
    keys = layout.key_map(adapter, targets)
    tensors, seen, owner = {}, set(), {}
    for (path, leaf), key in keys.items():
        if key in owner:
            raise AdapterMismatchError(f"{fn}: adapter[{owner[key][0]!r}][{owner[key][1]!r}] and adapter[{path!r}]"
                                       f"[{leaf!r}] both map to the file key {layout.PREFIX + key!r}.")
        owner[key] = (path, leaf)
        t = adapter[path][leaf].detach().to("cpu")
        if (not t.is_contiguous() or t.storage_offset() or t.untyped_storage().data_ptr() in seen
                or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[layout.PREFIX + key] = t
    if base_weights:
        tensors.update(_base_weight_tensors(base_weights, lora, fn))
    meta = {"version": _version(), "custom_rules": _custom_rules(lora, config)}
    metadata = {"format": "pt", "funclora": json.dumps(meta, sort_keys=True)}
    return folder, tensors, metadata, _config_text(config, lora)


def _base_weight_tensors(base_weights, lora: LoRA | None, fn: str) -> dict[str, torch.Tensor]:
    """``{PEFT file key: tensor}`` for base weights written beside the adapter (save_embedding_layers)."""
    if lora is None:
        raise TypeError(f"{fn}: base_weights= needs model= (or lora=): PEFT's key of a base weight depends on "
                        "whether its module carries LoRA.")
    keys = {name: key for key, name in layout.base_weight_keys(lora).items()}
    out = {}
    for name, value in base_weights.items():
        if name not in keys:
            raise ValueError(f"{fn}: base_weights[{name!r}] is not a parameter of the model's input / output "
                             f"embedding; PEFT's files carry only those ({sorted(keys)}).")
        want = tuple(lora.model.get_parameter(name).shape)
        if tuple(value.shape) != want:
            raise AdapterMismatchError(f"{fn}: base_weights[{name!r}] has shape {tuple(value.shape)} but the model's "
                                       f"{name} has {want}.")
        out[layout.PREFIX + keys[name]] = value.detach().to("cpu").contiguous().clone()
    return out


def _split_base_weights(stripped: dict, lora: LoRA, file: str, fn: str) -> dict[str, torch.Tensor]:
    """Take PEFT's saved base weights out of ``stripped`` (in place): ``{parameter name: tensor}``.

    The adapter does not hold them; when they differ from the model's own, a warning says where
    they are used (PEFT loads them into its model).
    """
    keys = layout.base_weight_keys(lora)
    found = {keys[k]: stripped.pop(k) for k in list(stripped) if k in keys}
    differ = []
    for name, value in found.items():
        own = lora.model.get_parameter(name)
        if own.shape != value.shape or not torch.equal(own.detach().cpu(), value.to(own.dtype)):
            differ.append(name)
    if differ:
        warnings.warn(f"{fn}: {file!r} also holds base weights of the model ({differ}: PEFT's save_embedding_layers, "
                      "e.g. after resize_token_embeddings) that differ from the model's own; PEFT's model uses the "
                      "file's. The adapter returned here does not carry them: fl.PeftModel.from_pretrained applies "
                      "them, or pass them as params (funclora.io.read_base_weights) to lora.apply.",
                      UserWarning, stacklevel=3)
    return found


def _check_pytree(adapter, fn):
    for path, leaves in checked_leaves(adapter, fn, "adapter").items():
        for leaf, value in leaves.items():
            if not value.is_floating_point():  # complex / integer leaves: load_adapter (and PEFT) refuse them
                raise TypeError(f"{fn}: adapter[{path!r}][{leaf!r}] has dtype {value.dtype}; adapter files hold "
                                "real floating-point tensors (cast it, e.g. value.float()).")
            if value.is_meta:
                raise TypeError(f"{fn}: adapter[{path!r}][{leaf!r}] is on the meta device: it has no values to "
                                "write. Save an adapter that lives on a real device.")
            if not bool(torch.isfinite(value).all()):  # a diverged run: every output of the file would be NaN
                raise ValueError(f"{fn}: adapter[{path!r}][{leaf!r}] holds NaN or infinite values; an adapter "
                                 "file with them makes every output NaN in funclora and PEFT. Save a checkpoint "
                                 "from before training diverged (or lower the learning rate).")


def _check_ranks(adapter, targets, config: LoraConfig, fn: str) -> None:
    """Without a model, each module target's ``lora_A`` must have the config's ``r`` for its path
    as its first axis: a stacked adapter, or one made with another config, would be written
    unchecked and PEFT could not load it. (``target_parameters`` are skipped: a stack of experts
    has ``r·E`` rows, and only the model knows ``E``.)"""
    for path, target in targets.items():
        if target.module_path != path:
            continue
        r = _pattern_value(path, config.rank_pattern, config.r, set())
        for leaf in target.leaves:
            t = adapter[path][leaf]
            if leaf.rsplit(".", 1)[-1] not in ("lora_A", "lora_embedding_A") or (t.dim() >= 2 and t.shape[0] == r):
                continue
            hint = (" It looks stacked (fl.stack): save each adapter, e.g. fl.unstack(stacked)[i]."
                    if t.dim() >= 3 and t.shape[1] == r else
                    " Was it made with another config? Pass lora= (or model=) to check it against the model.")
            raise AdapterMismatchError(
                f"{fn}: adapter[{path!r}][{leaf!r}] has shape {tuple(t.shape)}, but the config's rank for "
                f"{path!r} is {r}: a LoRA A factor is (r, ...).{hint}")


def _version() -> str:
    from . import __version__

    return __version__


def _name(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _custom_rules(lora: LoRA | None, config: LoraConfig) -> list[dict[str, str]]:
    """``[{"module_type": "pkg.mod:Type", "rule": "pkg.mod:Rule"}]`` for rules that are not built in."""
    pairs = {}
    if lora is None:
        pairs = {_name(t): _name(type(r)) for t, r in config._custom_modules.items()}
    else:
        for t in lora.plan.targets.values():
            builtin = next((r for c in type(t.module).__mro__ for r in (_BUILTIN.get(c), _BUILTIN.get(
                f"{c.__module__}.{c.__qualname__}")) if r is not None), None)
            if isinstance(t.rule, ParameterRule) or t.rule is builtin:
                continue
            registered = next((k for k in config._custom_modules if isinstance(t.module, k)), None) or \
                next((c for c in type(t.module).__mro__ if c in _USER), type(t.module))
            pairs[_name(registered)] = _name(type(t.rule))
    return [{"module_type": k, "rule": v} for k, v in sorted(pairs.items())]


def _anchor(path: str) -> str:
    return "^" + re.escape(path) + "$"


def _config_text(config: LoraConfig, lora: LoRA | None) -> str:
    """``adapter_config.json`` as PEFT writes it (indent 2, sorted keys; pattern dicts keep their order)."""
    data = config.to_dict()
    data["peft_type"] = "LORA"
    data["inference_mode"] = True
    if lora is not None:
        plan, model = lora.plan, lora.model
        spec = config.target_modules
        if spec is None:
            data["target_modules"] = plan.target_modules   # the default table's entries, e.g. ["c_attn"]
        elif isinstance(spec, str) and spec.lower() == "all-linear":
            data["target_modules"] = _explicit_targets(lora)
        data["rank_pattern"] = {_anchor(p): t.r for p, t in plan.targets.items() if t.r != config.r}
        data["alpha_pattern"] = {_anchor(p): t.alpha for p, t in plan.targets.items() if t.alpha != config.lora_alpha}
        data["fan_in_fan_out"] = any(t.path == t.module_path and any(
            _name(c) == "transformers.pytorch_utils:Conv1D" for c in type(t.module).__mro__)
            for t in plan.targets.values())
        if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
            data["base_model_name_or_path"] = model.name_or_path   # transformers models; as PEFT writes it
        if config.task_type is None and config.auto_mapping is None:
            data["auto_mapping"] = {"base_model_class": type(model).__name__,
                                    "parent_library": type(model).__module__}
    return json.dumps({k: data[k] for k in sorted(data)}, indent=2) + "\n"


def _explicit_targets(lora: LoRA):
    """The module paths targeted, as a list PEFT matches to exactly these modules (else a regex)."""
    plan = lora.plan
    names = list(dict.fromkeys(t.module_path for t in plan.targets.values() if t.path == t.module_path))
    saved = list(plan.saved)
    for key, _ in lora.model.named_modules():
        if key and key not in names and _list_match(key, names) and not any(
                key == s or key.startswith(s + ".") for s in saved):
            return "(" + "|".join(re.escape(n) for n in names) + ")"
    return names


def _rules_in(meta: dict, file: str, fn: str) -> list[dict]:
    try:
        info = json.loads(meta.get("funclora", "{}"))
        rules = info.get("custom_rules", [])
        if not all(isinstance(r, dict) and isinstance(r.get("module_type"), str) and isinstance(r.get("rule"), str)
                   for r in rules):
            raise ValueError("malformed custom_rules")
    except (ValueError, AttributeError, TypeError) as e:
        raise AdapterFileError(f"{fn}: {file!r} has unreadable funclora metadata ({e}). Save it again.") from None
    return rules


def _resolve(name: str):
    """The object named ``"module:QualName"``, from a module that is already imported.

    A file never makes funclora import code: the module must be loaded already (it is, when
    the user's model or rule code has been imported).
    """
    module, _, qualname = name.partition(":")
    if not qualname or "<locals>" in qualname:
        raise LookupError(f"{name!r} is not an importable name (defined inside a function?)")
    if module not in sys.modules:
        raise LookupError(f"module {module!r} is not imported (funclora never imports code a file names)")
    obj = sys.modules[module]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _with_rules(config: LoraConfig, rules: list[dict], *, required: bool, file: str, fn: str) -> LoraConfig:
    """``config`` with the file's custom rules registered (a copy when anything is added)."""
    known = {_name(t) for t in config._custom_modules} | {_name(t) for t in _USER}
    added = {}
    for entry in rules:
        type_name, rule_name = entry["module_type"], entry["rule"]
        if type_name in known:
            continue
        try:
            module_type, rule_cls = _resolve(type_name), _resolve(rule_name)
            if not (isinstance(module_type, type) and isinstance(rule_cls, type) and issubclass(rule_cls, Rule)):
                raise LookupError(f"{rule_name!r} is not a funclora.Rule subclass")
            added[module_type] = rule_cls()
        except Exception as e:  # noqa: BLE001 - any failure means: the user must register it
            msg = (f"{fn}: {file!r} was saved with the custom rule {rule_name} for modules of type {type_name}, "
                   f"which cannot be re-created here ({type(e).__name__}: {e}). Register it before loading: "
                   f"config = fl.LoraConfig.from_pretrained(path); config.register_custom_module({{"
                   f"{type_name.rpartition(':')[2]}: {rule_name.rpartition(':')[2]}()}}); then pass config=config.")
            if required:
                raise UnsupportedModuleError(msg) from None
            warnings.warn(msg, UserWarning, stacklevel=3)
    if not added:
        return config
    config = copy.copy(config)
    config._custom_modules = dict(config._custom_modules)
    config.register_custom_module(added)
    return config


def read_config(folder: str | os.PathLike) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter folder (``LoraConfig.from_pretrained``).

    Custom rules recorded in the folder's safetensors metadata are registered on the config
    when they can be imported; others must be registered by hand (``config.register_custom_module``).
    """
    fn = "LoraConfig.from_pretrained"
    folder = files.adapter_folder(folder, None, fn)
    config = files.read_config_file(folder, fn)
    file = os.path.join(folder, files.WEIGHTS_NAME)
    try:
        header, _ = files.read_header(file, fn)
        rules = _rules_in(header.get("__metadata__", {}), file, fn)
    except (OSError, AdapterFileError):
        return config  # reading the weights reports their problems
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user registers the others by hand, as in PEFT
        return _with_rules(config, rules, required=False, file=file, fn=fn)


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
    fn = "load_adapter"
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{fn}: `dtype` must be a torch.dtype or None, got {dtype!r}.")
    folder = files.adapter_folder(path, adapter_name, fn)
    if config is None:
        config = files.read_config_file(folder, fn)
    elif not isinstance(config, LoraConfig):
        raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig, got {type(config).__name__}.")
    file = os.path.join(folder, files.WEIGHTS_NAME)
    tensors, meta = files.read_weights(folder, fn)
    config = _with_rules(config, _rules_in(meta, file, fn), required=model is not None, file=file, fn=fn)
    stripped = layout.strip_prefix(tensors)
    if model is None:
        adapter = layout.parse_keys(stripped, config, file, strict, fn)
    else:
        try:
            lora = LoRA(model, config)
        except ValueError as e:
            raise type(e)(f"{fn}: the config of {folder!r} does not fit the model: {e}") from None
        _split_base_weights(stripped, lora, file, fn)
        adapter = layout.match_keys(stripped, lora, file, strict, fn)
        if dtype is None:  # as PEFT: the file's values land in leaves of the dtypes init() gives
            want = lora.leaf_dtypes()
            adapter = {p: {leaf: t.to(want[p][leaf]) if t.is_floating_point() else t for leaf, t in leaves.items()}
                       for p, leaves in adapter.items()}
    if dtype is not None or device is not None:
        adapter = {p: {leaf: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
                       for leaf, t in leaves.items()} for p, leaves in adapter.items()}
    return adapter, config


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
        config = files.read_config_file(folder, fn)
    tensors, meta = files.read_weights(folder, fn)
    config = _with_rules(config, _rules_in(meta, os.path.join(folder, files.WEIGHTS_NAME), fn), required=True,
                         file=os.path.join(folder, files.WEIGHTS_NAME), fn=fn)
    keys = layout.base_weight_keys(LoRA(model, config))
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
