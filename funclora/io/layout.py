"""PEFT's state-dict keys for an adapter pytree, both directions.

PEFT replaces each targeted module by a wrapper that keeps the original as ``base_layer``, so
a parameter's key gains ``base_layer`` after every wrapped ancestor; several
``target_parameters`` on one module nest one wrapper each (first registered = innermost), and
an MHA's ``out_proj`` is wrapped inside the MHA's ``base_layer``. With the model's plan the
layout is exact; without it, it is inferred from leaf names and the config.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from ..core._kinds import name_match
from ..core.bound import Adapter, Bound
from ..core.config import LoraConfig
from ..errors import AdapterMismatchError

PREFIX = "base_model.model."



@dataclass(frozen=True)
class FileTarget:
    """A LoRA target as the file sees it."""

    module_path: str
    file_key: Callable[[str], str]   # leaf -> suffix after the module's PEFT path
    leaves: tuple[str, ...]          # the LoRA leaves (not biases)
    outer: int = 0                   # PEFT wrappers around this one on the same module


def _default_file_key(leaf: str) -> str:
    """Rule.file_key for the built-in rules, decided from the leaf name alone."""
    prefix, _, last = leaf.rpartition(".")
    suffix = last + ".weight" if last in ("lora_A", "lora_B") else last
    return f"base_layer.{prefix}.{suffix}" if prefix else suffix


def _is_lora_leaf(leaf: str) -> bool:
    return leaf.rpartition(".")[2].startswith("lora_")


def key_map(items: Mapping[str, object], targets: dict[str, FileTarget]) -> dict[tuple[str, str], str]:
    """``{(path, leaf): file key without prefix}`` for ``items`` (``{path: leaves}``)."""
    wraps: Counter = Counter(t.module_path for t in targets.values())
    # MHA: PEFT also wraps out_proj (inside the MHA's base_layer) in a lora.Linear
    wraps.update({f"{t.module_path}.{leaf.rpartition('.')[0]}" for t in targets.values() for leaf in t.leaves
                  if "." in leaf and t.file_key(leaf).startswith(f"base_layer.{leaf.rpartition('.')[0]}.")})

    def wrapped(name: str) -> str:  # PEFT's path of ``name``: base_layer after each wrapped ancestor
        parts = name.split(".")
        out = []
        for i, part in enumerate(parts):
            out.append(part)
            if i < len(parts) - 1:
                out += ["base_layer"] * wraps.get(".".join(parts[: i + 1]), 0)
        return ".".join(out)

    keys = {}
    for path, leaves in items.items():
        t = targets.get(path)
        for leaf in leaves:
            if t is not None and leaf in t.leaves:
                keys[(path, leaf)] = f"{wrapped(t.module_path)}{'.base_layer' * t.outer}.{t.file_key(leaf)}"
            else:
                keys[(path, leaf)] = wrapped(f"{path}.{leaf}")
    return keys


def targets_from_bound(bound: Bound) -> dict[str, FileTarget]:
    """The exact layout, from the plan (rules' file keys, wrapper nesting in plan order)."""
    per_module: dict[str, list[str]] = {}
    for path, t in bound.plan.targets.items():
        if t.path != t.module_path:
            per_module.setdefault(t.module_path, []).append(path)
    out = {}
    for path, t in bound.plan.targets.items():
        lora_leaves = tuple(leaf for leaf, spec in bound.specs[path].items() if not isinstance(spec, tuple))
        siblings = per_module.get(t.module_path, [])
        outer = len(siblings) - 1 - siblings.index(path) if t.path != t.module_path else len(siblings)
        out[path] = FileTarget(t.module_path, t.rule.file_key, lora_leaves, outer)
    return out


def base_weight_keys(bound: Bound) -> dict[str, str]:
    """``{file key: model parameter name}`` for the base weights PEFT saves beside an adapter.

    PEFT's ``save_embedding_layers`` writes the parameters of the model's input / output
    embedding (``get_input_embeddings`` / ``get_output_embeddings``): as ``<path>.base_layer.<name>``
    when the module carries LoRA, else as ``<path>.<name>``. Keys the adapter itself uses (a saved
    module, a trained bias) are not base weights.
    """
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layers.append(getattr(bound.model, getter)())
        except (AttributeError, NotImplementedError, TypeError):  # not a transformers model, or no such layer
            pass
    layers = [m for m in layers if isinstance(m, torch.nn.Module)]
    if not layers:
        return {}
    ids = {id(m) for m in layers}
    targeted = {t.module_path for t in bound.plan.targets.values() if t.path == t.module_path}
    adapter_keys = set(key_map(bound.shapes(), targets_from_bound(bound)).values())
    out = {}
    for path, module in bound.model.named_modules():
        if id(module) not in ids or not path:
            continue
        for leaf, _ in module.named_parameters(recurse=False):
            key = f"{path}.base_layer.{leaf}" if path in targeted else f"{path}.{leaf}"
            if key not in adapter_keys:
                out[key] = f"{path}.{leaf}"
    return out


def module_targeted(path: str, config: LoraConfig) -> bool:
    """Whether ``target_modules`` names ``path`` (``"all-linear"`` / ``None``: yes, unless only
    parameters are targeted)."""
    spec = config.target_modules
    if spec is None or (isinstance(spec, str) and spec.lower() == "all-linear"):
        return not config.target_parameters
    return name_match(path, spec) is not None


def targets_from_names(items: Mapping[str, object], config: LoraConfig, fn: str) -> dict[str, FileTarget]:
    """Targets inferred without a model: paths with ``lora_*`` leaves, classified by the config."""
    if config._custom_modules:
        rule = next(iter(config._custom_modules.values()))
        raise TypeError(f"{fn}: the config has custom rules ({rule!r}, ...); pass model= (or lora=) so the "
                        "file keys follow each rule's leaves and file_key.")
    out: dict[str, FileTarget] = {}
    per_module: dict[str, list[str]] = {}
    for path, leaves in items.items():
        lora_leaves = tuple(leaf for leaf in leaves if _is_lora_leaf(leaf))
        if not lora_leaves:
            continue
        is_param = (bool(config.target_parameters) and "." in path
                    and name_match(path, config.target_parameters) is not None
                    and not module_targeted(path, config))
        module_path = path.rsplit(".", 1)[0] if is_param else path
        if is_param:
            per_module.setdefault(module_path, []).append(path)
        out[path] = FileTarget(module_path, _default_file_key, lora_leaves)
    for module_path, paths in per_module.items():
        if len(paths) > 1:
            raise TypeError(
                f"{fn}: {module_path!r} has {len(paths)} target_parameters ({', '.join(paths)}); PEFT nests "
                "them in the module's parameter registration order, which only the model knows. Pass model=.")
        if module_path in out:
            raise TypeError(f"{fn}: {module_path!r} is targeted both as a module and through its parameter "
                            f"{paths[0]!r}; pass model= to place both in the file.")
    return out


def strip_prefix(tensors: dict) -> dict[str, torch.Tensor]:
    """The keys without ``base_model.model.``."""
    # PEFT's files always carry the prefix; files from get_peft_model_state_dict on a bare model do not
    if any(k.startswith(PREFIX) for k in tensors):
        return {k[len(PREFIX):] if k.startswith(PREFIX) else k: t for k, t in tensors.items()}
    return dict(tensors)


def _shape(t) -> tuple:
    return tuple(t.shape)


def match_keys(stripped: dict, bound: Bound, file: str, strict: bool, fn: str) -> Adapter:
    """The pytree ``lora.init()`` would make, filled from the file's (prefix-less) keys; checks shapes."""
    shapes = bound.shapes()
    keys = key_map(shapes, targets_from_bound(bound))
    missing = [PREFIX + k for k in keys.values() if k not in stripped]
    expected = set(keys.values())
    unexpected = [PREFIX + k if not k.startswith(PREFIX) else k for k in stripped if k not in expected]
    if strict and (missing or unexpected):
        raise AdapterMismatchError(
            f"{fn}: the keys of {file!r} do not fit the model: missing {_few(missing)}, unexpected "
            f"{_few(unexpected)}. Was it saved for another model or config? strict=False loads it anyway "
            "(missing leaves get a fresh init, unexpected keys are ignored).")
    for (path, leaf), key in keys.items():
        if key in stripped and _shape(stripped[key]) != shapes[path][leaf]:
            hint = " rank_pattern order (PEFT writes it sorted)," if bound.config.rank_pattern else ""
            raise AdapterMismatchError(
                f"{fn}: {file!r}: {PREFIX + key!r} has shape {_shape(stripped[key])} but the model's {path} needs "
                f"{shapes[path][leaf]} (adapter[{path!r}][{leaf!r}]). Was the adapter trained on another model, "
                f"with another r,{hint} or another config?")
    fresh = bound.init(torch.Generator().manual_seed(0), None) if missing else None
    if missing:
        warnings.warn(f"{fn}: {file!r} lacks {_few(missing)}; those leaves get a fresh init (LoRA B = 0, "
                      "saved modules and biases = the model's values).", UserWarning, stacklevel=3)
    return {path: {leaf: stripped[keys[(path, leaf)]] if keys[(path, leaf)] in stripped else fresh[path][leaf]
                   for leaf in leaves} for path, leaves in shapes.items()}


def _few(keys: list[str], n: int = 8) -> str:
    return "[]" if not keys else str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


def _natural(path: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def parse_keys(stripped: dict, config: LoraConfig, file: str, strict: bool, fn: str) -> Adapter:
    """Without a model: the pytree from the key names (targets, then saved modules, then biases)."""
    saved_specs = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        saved_specs += [n for n in ("classifier", "score") if n not in saved_specs]
    targets: dict[str, dict[str, torch.Tensor]] = {}
    depth: dict[str, set] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, t in stripped.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
            lead, leaf = parts[:-2], parts[-2]
        elif parts[-1] in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            lead, leaf = parts[:-1], parts[-1]
        else:
            lead = None
        if lead is not None and lead and lead[0] != "base_layer":
            cut = lead.index("base_layer") if "base_layer" in lead else len(lead)
            module, rest = ".".join(lead[:cut]), lead[cut:]
            inner = [p for p in rest if p != "base_layer"]
            if not inner:  # a module target, or target_parameters wrappers (len(rest) = wrappers outside)
                targets.setdefault(module, {})[leaf] = t
                depth.setdefault(module, set()).add(len(rest))
                continue
            if rest == ["base_layer", *inner] and len(inner) == 1:  # MHA's out_proj
                targets.setdefault(module, {})[f"{inner[0]}.{leaf}"] = t
                depth.setdefault(module, set()).add(0)
                continue
            unexpected.append(PREFIX + key)
            continue
        name = ".".join(p for p in parts if p != "base_layer")
        segs = name.split(".")
        owner = next((".".join(segs[:i]) for i in range(1, len(segs)) if name_match(".".join(segs[:i]), saved_specs)),
                     None)
        if owner is not None:
            saved.setdefault(owner, {})[name[len(owner) + 1:]] = t
        elif config.bias != "none" and len(segs) > 1 and segs[-1] == "bias":
            biases.setdefault(name[:-5], {})["bias"] = t
        else:
            unexpected.append(PREFIX + key)
    if unexpected and strict:
        raise AdapterMismatchError(
            f"{fn}: {file!r} has keys that are neither LoRA factors, modules_to_save parameters nor trained "
            f"biases of its config: {_few(unexpected)}. strict=False ignores them.")
    adapter: Adapter = {}
    for module in sorted(targets, key=_natural):
        leaves = targets[module]
        path = _target_path(module, depth[module], config, file, fn)
        adapter[path] = {leaf: leaves[leaf] for leaf in sorted(leaves)}
    for group in (saved, biases):
        for path in sorted(group, key=_natural):
            adapter.setdefault(path, {}).update(group[path])
    return adapter


def _target_path(module: str, depths: set, config: LoraConfig, file: str, fn: str) -> str:
    """The adapter key of the LoRA factors at ``module``: the module path, or a parameter path."""
    params = config.target_parameters or []
    names = [e.rpartition(".")[2] for e in params]
    candidates = list(dict.fromkeys(n for n in names if name_match(f"{module}.{n}", params)))
    if len(depths) > 1 or (len(candidates) > 1 and not module_targeted(module, config)):
        what = (f"nests {len(depths)} LoRA wrappers on {module!r}" if len(depths) > 1 else
                f"has LoRA factors on {module!r} that may belong to any of the parameters {candidates}")
        raise AdapterMismatchError(
            f"{fn}: {file!r} {what} (target_parameters={config.target_parameters}); which parameter each "
            "belongs to depends on the model (PEFT nests them in parameter registration order). Pass model=.")
    if candidates and not module_targeted(module, config):
        return f"{module}.{candidates[0]}"
    return module
