"""Writing adapter folders in PEFT's format (see :mod:`funclora.io` for the layout)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from .. import _files as files
from .._version import __version__
from ..core._kinds import is_conv1d, name_match
from ..core.bound import Adapter, Bound
from ..core.config import LoraConfig
from ..core.pytree import checked_leaves
from ..core.registry import builtin_rule, qualified_name, user_rule_types
from ..core.rules import ParameterRule
from ..core.targeting import pattern_value
from ..errors import AdapterMismatchError
from . import layout

__all__ = ["save_adapter"]


def save_adapter(path: str | os.PathLike, adapter: Adapter, config: LoraConfig | Mapping | None = None, *,
                 model: torch.nn.Module | None = None, lora=None,
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
            ``lora``. See :func:`~funclora.io.read_base_weights`.

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
        jobs = [(files.subfolder(path, adapter_name, fn), adapter, config, _bound_of(lora, fn))]
    prepared = [_prepare(folder, a, c, model, b, fn, base_weights) for folder, a, c, b in jobs]
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


def _bound_of(lora, fn: str) -> Bound | None:
    """The :class:`Bound` of a ``lora=`` argument (a :class:`~funclora.LoRA`), or None."""
    if lora is None:
        return None
    bound = getattr(lora, "bound", None)
    if not isinstance(bound, Bound):
        raise TypeError(f"{fn}: `lora` must be a funclora.LoRA, got {type(lora).__name__}.")
    return bound


def _prepare(folder, adapter, config, model, bound: Bound | None, fn, base_weights=None):
    """Everything to write for one adapter, validated before any file is touched."""
    if bound is None and model is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig, got {type(config).__name__}.")
        bound = Bound(model, config)
    if bound is not None:
        if config is not None and config is not bound.config:
            raise TypeError(f"{fn}: pass either lora= or config=, not both (lora.config is the config).")
        if model is not None and model is not bound.model:
            raise TypeError(f"{fn}: `model` is not the model of `lora`.")
        config = bound.config
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{fn}: `config` must be a funclora.LoraConfig, got {type(config).__name__}.")
    _check_pytree(adapter, fn)
    if bound is not None:
        try:
            bound.check(adapter)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"{fn}: {str(e).removeprefix('LoRA: ')}") from None
        targets = layout.targets_from_bound(bound)
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
        tensors.update(_base_weight_tensors(base_weights, bound, fn))
    meta = {"version": __version__, "custom_rules": _custom_rules(bound, config)}
    metadata = {"format": "pt", "funclora": json.dumps(meta, sort_keys=True)}
    return folder, tensors, metadata, _config_text(config, bound)


def _base_weight_tensors(base_weights, bound: Bound | None, fn: str) -> dict[str, torch.Tensor]:
    """``{PEFT file key: tensor}`` for base weights written beside the adapter (save_embedding_layers)."""
    if bound is None:
        raise TypeError(f"{fn}: base_weights= needs model= (or lora=): PEFT's key of a base weight depends on "
                        "whether its module carries LoRA.")
    keys = {name: key for key, name in layout.base_weight_keys(bound).items()}
    out = {}
    for name, value in base_weights.items():
        if name not in keys:
            raise ValueError(f"{fn}: base_weights[{name!r}] is not a parameter of the model's input / output "
                             f"embedding; PEFT's files carry only those ({sorted(keys)}).")
        want = tuple(bound.model.get_parameter(name).shape)
        if tuple(value.shape) != want:
            raise AdapterMismatchError(f"{fn}: base_weights[{name!r}] has shape {tuple(value.shape)} but the model's "
                                       f"{name} has {want}.")
        out[layout.PREFIX + keys[name]] = value.detach().to("cpu").contiguous().clone()
    return out


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
        r = pattern_value(path, config.rank_pattern, config.r, set())
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


def _custom_rules(bound: Bound | None, config: LoraConfig) -> list[dict[str, str]]:
    """``[{"module_type": "pkg.mod:Type", "rule": "pkg.mod:Rule"}]`` for rules that are not built in."""
    pairs = {}
    if bound is None:
        pairs = {qualified_name(t): qualified_name(type(r)) for t, r in config._custom_modules.items()}
    else:
        registered_types = user_rule_types()
        for t in bound.plan.targets.values():
            if isinstance(t.rule, ParameterRule) or t.rule is builtin_rule(t.module):
                continue
            registered = next((k for k in config._custom_modules if isinstance(t.module, k)), None) or \
                next((c for c in type(t.module).__mro__ if c in registered_types), type(t.module))
            pairs[qualified_name(registered)] = qualified_name(type(t.rule))
    return [{"module_type": k, "rule": v} for k, v in sorted(pairs.items())]


def _anchor(path: str) -> str:
    return "^" + re.escape(path) + "$"


def _config_text(config: LoraConfig, bound: Bound | None) -> str:
    """``adapter_config.json`` as PEFT writes it (indent 2, sorted keys; pattern dicts keep their order)."""
    data = config.to_dict()
    data["peft_type"] = "LORA"
    data["inference_mode"] = True
    if bound is not None:
        plan, model = bound.plan, bound.model
        spec = config.target_modules
        if spec is None:
            data["target_modules"] = plan.target_modules   # the default table's entries, e.g. ["c_attn"]
        elif isinstance(spec, str) and spec.lower() == "all-linear":
            data["target_modules"] = _explicit_targets(bound)
        data["rank_pattern"] = {_anchor(p): t.r for p, t in plan.targets.items() if t.r != config.r}
        data["alpha_pattern"] = {_anchor(p): t.alpha for p, t in plan.targets.items() if t.alpha != config.lora_alpha}
        data["fan_in_fan_out"] = any(t.path == t.module_path and is_conv1d(t.module) for t in plan.targets.values())
        if config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
            data["base_model_name_or_path"] = model.name_or_path   # transformers models; as PEFT writes it
        if config.task_type is None and config.auto_mapping is None:
            data["auto_mapping"] = {"base_model_class": type(model).__name__,
                                    "parent_library": type(model).__module__}
    return json.dumps({k: data[k] for k in sorted(data)}, indent=2) + "\n"


def _explicit_targets(bound: Bound):
    """The module paths targeted, as a list PEFT matches to exactly these modules (else a regex)."""
    plan = bound.plan
    names = list(dict.fromkeys(t.module_path for t in plan.targets.values() if t.path == t.module_path))
    saved = list(plan.saved)
    for key, _ in bound.model.named_modules():
        if key and key not in names and name_match(key, names) and not any(
                key == s or key.startswith(s + ".") for s in saved):
            return "(" + "|".join(re.escape(n) for n in names) + ")"
    return names
