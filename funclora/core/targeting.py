"""PEFT's name-matching rules, resolved once into a printable :class:`Plan`.

Per module path (``named_modules`` order, root skipped), as PEFT 0.21 does:

1. ``exclude_modules`` matches → skipped;
2. inside a ``modules_to_save`` module → skipped;
3. ``target_modules``: a list entry matches the whole path or a dotted suffix; a string is a
   regex that must match the whole path; ``"all-linear"`` (any case) means every ``nn.Linear`` /
   ``Conv1D`` except a transformers model's output head;
4. ``layers_to_transform`` filters suffix matches by layer index (exact matches bypass it).

``target_parameters`` entries match ``"<module path>.<param>"`` exactly or as a dotted suffix.
``modules_to_save`` entries match a whole path or a dotted suffix (PEFT's plain ``endswith``
also matches ``xfc`` for ``fc``, issue #1917; funclora does not copy that).
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass, field

from torch import nn

from ..errors import TargetNotFoundError, UnsupportedModuleError
from ._kinds import is_linear, is_pretrained, name_match
from .config import LoraConfig
from .default_targets import default_targets
from .quantized import for_quantized_weight
from .registry import find_rule, supported_types
from .suggest import suggest_targets
from .rules import ParameterRule, Rule
from .target_checks import check_dense_weights, check_dora, check_not_parametrized

__all__ = ["Target", "Plan", "make_plan"]


@dataclass(frozen=True)
class Target:
    """One adapted module (or parameter) and its resolved rank and scaling.

    Attributes:
        path: the adapter key: the module path, or the parameter path for ``target_parameters``.
        module_path: the module that owns the adapted parameter(s).
        module, rule: that module and the :class:`~funclora.Rule` that adapts it.
        r, alpha, scaling: rank, ``lora_alpha`` and ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: ``lora_dropout`` for this target (0 if its rule applies none).
        dora: whether the target is DoRA (``use_dora=True``): a ``lora_magnitude_vector`` leaf too.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> t = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, lora_alpha=4)).plan.targets["0"]
        >>> t.module_path, t.r, t.scaling, t.rule
        ('0', 2, 2.0, LinearRule())
    """

    path: str                 # adapter key: module path, or parameter path for target_parameters
    module_path: str
    module: nn.Module = field(repr=False, compare=False)
    rule: Rule = field(compare=False)
    r: int = 8
    alpha: float = 8
    scaling: float = 1.0
    dropout: float = 0.0
    dora: bool = False

    def __str__(self):
        kind = type(self.module).__name__
        dora = "  DoRA" if self.dora else ""
        return f"{self.path}  {kind}  r={self.r} alpha={self.alpha:g} scaling={self.scaling:.4g}  {self.rule!r}{dora}"


@dataclass(frozen=True)
class Plan:
    """What a config targets on a model: LoRA targets, saved modules and trained biases.

    Attributes:
        targets: ``{adapter key: Target}`` in ``named_modules`` order.
        saved: ``{module path: names of its parameters}`` for ``modules_to_save``.
        biases: ``{module path: ("bias",)}`` for ``bias="all"`` / ``"lora_only"``.
        target_modules: the resolved ``target_modules`` (explicit names for "all-linear" / None).

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> print(fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2)).plan)
        LoRA plan: 1 targets, 1 saved modules, 0 trained biases
          0  Linear  r=2 alpha=8 scaling=4  LinearRule()
          2  saved (weight, bias)
    """

    targets: dict[str, Target]
    saved: dict[str, tuple[str, ...]]
    biases: dict[str, tuple[str, ...]]
    target_modules: list[str] | str | None = None

    def __str__(self):
        lines = [f"LoRA plan: {len(self.targets)} targets, {len(self.saved)} saved modules, "
                 f"{len(self.biases)} trained biases"]
        lines += [f"  {t}" for t in self.targets.values()]
        lines += [f"  {p}  saved ({', '.join(names)})" for p, names in self.saved.items()]
        lines += [f"  {p}.bias  trained bias" for p in self.biases]
        return "\n".join(lines)


def _layer_index(key: str, layers_pattern) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        return int(m.group(1)) if m else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        m = re.match(rf"(?:.*?\.)?(?:{pattern})\.(\d+)\.", key)
        if m:
            return int(m.group(1))
    return None


def pattern_value(key: str, patterns: dict, default, used: set):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            used.add(pattern)
            return value
    return default


def _all_linear(model: nn.Module, config: LoraConfig) -> list[str]:
    names = [n for n, m in model.named_modules() if n and is_linear(m)]
    exclude = set()
    if is_pretrained(model):
        head = model.get_output_embeddings()
        if head is not None:
            exclude |= {n for n, m in model.named_modules() if m is head}
        elif config.task_type == "SEQ_CLS":
            for attr in ("score", "classifier"):
                if hasattr(model, attr):
                    exclude.add(attr)
                    break
    return [n for n in names if n not in exclude]


def _resolve_target_modules(model: nn.Module, config: LoraConfig):
    spec = config.target_modules
    if isinstance(spec, str) and spec.lower() == "all-linear":
        return _all_linear(model, config)
    if spec is None and not config.target_parameters:
        spec = default_targets(model)
        if spec is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            known = f"model_type {model_type!r} has no default targets" if model_type else \
                f"{type(model).__name__} is not a transformers model with a known model_type"
            hint = suggest_targets(model)
            fix = (f"e.g. target_modules={hint.target_modules!r}, or 'all-linear', or entries from "
                   "fl.suggest_targets(model)" if hint.target_modules is not None else
                   "the model has no nn.Linear / Conv1D layer: name other modules in target_modules, or "
                   "adapt raw parameters with target_parameters")
            table = (" The model's linear layers by role, each with the target_modules entry that "
                     f"matches exactly them:\n{hint}") if hint.groups else ""
            raise TargetNotFoundError(
                f"LoRA: target_modules is None and {known}. Please specify `target_modules` or "
                f"`target_parameters`: {fix}.{table}"
            )
    return spec


def _not_found(model, config, spec, excluded) -> TargetNotFoundError:
    names = [n for n, _ in model.named_modules() if n]
    if spec == []:
        return TargetNotFoundError(
            "LoRA: No `target_modules` passed but also no `target_parameters` found. Please check "
            "the values for these arguments."
        )
    if excluded:
        return TargetNotFoundError(
            "LoRA: No modules were targeted for adaptation: every module matched by target_modules="
            f"{spec!r} is excluded by exclude_modules={config.exclude_modules!r} or "
            f"modules_to_save={config.modules_to_save!r} (excluded: {sorted(excluded)[:8]}). Check "
            "your `target_modules`, `exclude_modules` and `modules_to_save`."
        )
    wanted = [spec] if isinstance(spec, str) else list(spec or [])
    pool = names + sorted({n.rsplit(".", 1)[-1] for n in names})
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w, pool, n=4, cutoff=0.5)})
    note = ""
    if config.layers_to_transform is not None:
        note += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if config.layers_pattern:
        note += f" You also specified 'layers_pattern': {config.layers_pattern}."
    how = ("a regex that must match a whole module path" if isinstance(spec, str)
           else "entries that match a whole module path or its dotted suffix")
    return TargetNotFoundError(
        f"LoRA: Target modules {spec!r} not found in the base model {type(model).__name__} "
        f"(target_modules is {how}). Closest module names: {close or names[:8]}.{note} Print "
        "[n for n, _ in model.named_modules()] to see them all."
    )


def make_plan(model: nn.Module, config: LoraConfig) -> Plan:
    """Resolve ``config`` against ``model`` once: which modules get LoRA, which are saved."""
    spec = _resolve_target_modules(model, config)
    saved_specs = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        saved_specs += [n for n in ("classifier", "score") if n not in saved_specs]
    saved_regexes = [re.compile(rf"(^|.*\.){m}($|\..*)") for m in saved_specs]
    make = _TargetMaker(config)
    targets, excluded, candidates, used_exclude = _module_targets(model, config, spec, saved_regexes, make)
    _parameter_targets(model, config, saved_regexes, make, targets)
    if not targets:
        raise _not_found(model, config, spec, excluded)
    if config.exclude_modules and not used_exclude and candidates:
        warnings.warn(
            f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. "
            "Please check that exclude_modules was set correctly.", UserWarning, stacklevel=3)
    make.warn_unused_patterns()
    _check_no_overlap(targets)
    saved = _saved_modules(model, saved_specs, config.modules_to_save or [])
    biases = _trained_biases(model, config.bias, targets, saved)
    return Plan(targets, saved, biases, spec)


class _TargetMaker:
    """Builds each :class:`Target` (rank, alpha, scaling, dropout, checks), noting which
    ``rank_pattern`` / ``alpha_pattern`` keys were used."""

    def __init__(self, config: LoraConfig):
        self.config = config
        self.used_rank: set = set()
        self.used_alpha: set = set()

    def __call__(self, path: str, module_path: str, module: nn.Module, rule: Rule) -> Target:
        config = self.config
        rule = for_quantized_weight(module, rule)
        r = pattern_value(path, config.rank_pattern, config.r, self.used_rank)
        alpha = pattern_value(path, config.alpha_pattern, config.lora_alpha, self.used_alpha)
        rule.check(module, r, path)
        check_not_parametrized(module, rule, path)
        check_dense_weights(module, rule, path)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        dropout = float(config.lora_dropout) if rule.supports_dropout else 0.0
        if config.use_dora:
            check_dora(module, rule, path)
        return Target(path, module_path, module, rule, r, alpha, scaling, dropout, config.use_dora)

    def warn_unused_patterns(self) -> None:
        for name, patterns, used in (("rank_pattern", self.config.rank_pattern, self.used_rank),
                                     ("alpha_pattern", self.config.alpha_pattern, self.used_alpha)):
            unused = [k for k in patterns if k not in used]
            if unused:
                warnings.warn(f"The following {name} keys did not match any targeted module and were "
                              f"ignored: {unused}.", RuntimeWarning, stacklevel=4)


def _module_targets(model, config: LoraConfig, spec, saved_regexes, make: _TargetMaker):
    """``(targets, excluded, candidates, used_exclude)`` from ``target_modules`` (PEFT's steps 1-4)."""
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else layers
    targets: dict[str, Target] = {}
    excluded, candidates, used_exclude = set(), set(), False
    for key, module in model.named_modules():
        if not key:
            continue
        hit = name_match(key, spec) if spec is not None else None
        by_exclude = config.exclude_modules is not None and name_match(key, config.exclude_modules)
        if by_exclude or any(rx.match(key) for rx in saved_regexes):
            if hit:
                excluded.add(key)
                used_exclude |= bool(by_exclude)
            continue
        if hit == "suffix" and layers is not None and _layer_index(key, config.layers_pattern) not in layers:
            continue
        if not hit:
            continue
        candidates.add(key)
        rule = find_rule(module, config._custom_modules)
        if rule is None:
            raise UnsupportedModuleError(
                f"LoRA: target {key!r} is a {type(module).__module__}.{type(module).__qualname__} "
                f"({module!r}), which has no LoRA rule. Supported types: {', '.join(supported_types())}. "
                f"Register a rule (fl.register_rule({type(module).__name__}, MyRule()) or "
                f"config.register_custom_module({{{type(module).__name__}: MyRule()}})), adapt its "
                f"weights directly with target_parameters=['{key}.<param>'], or target only its "
                "supported submodules."
            )
        targets[key] = make(key, key, module, rule)
    return targets, excluded, candidates, used_exclude


def _parameter_targets(model, config: LoraConfig, saved_regexes, make: _TargetMaker, targets: dict) -> None:
    """Add the ``target_parameters`` targets to ``targets``; refuse or warn when none matched."""
    if not config.target_parameters:
        return
    matched = False
    for module_path, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{module_path}.{pname}" if module_path else pname
            if not name_match(key, config.target_parameters):
                continue
            if not module_path:
                raise UnsupportedModuleError(
                    f"LoRA: target_parameters matched {key!r} on the top-level module; Targeting an "
                    "nn.Parameter on the top-level module is not supported. Wrap it in a submodule."
                )
            if any(rx.match(module_path) for rx in saved_regexes):
                continue
            matched = True
            targets[key] = make(key, module_path, module, ParameterRule(pname))
    if not matched:
        if not targets:
            raise TargetNotFoundError(
                f"LoRA: target_parameters={config.target_parameters} matched no parameter of "
                f"{type(model).__name__}; entries match '<module path>.<parameter name>' or its dotted "
                f"suffix, e.g. {[n for n, _ in model.named_parameters()][:4]}."
            )
        warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                      RuntimeWarning, stacklevel=4)


def _check_no_overlap(targets: dict[str, Target]) -> None:
    owner: dict[str, str] = {}
    for t in targets.values():
        for name in t.rule.updated_parameters(t.module):
            full = f"{t.module_path}.{name}"
            if full in owner:
                raise UnsupportedModuleError(
                    f"LoRA: parameter {full!r} would be adapted twice, by target {owner[full]!r} and by "
                    f"{t.path!r}. Narrow target_modules / target_parameters so each weight is adapted once."
                )
            owner[full] = t.path


def _saved_modules(model, specs, explicit) -> dict[str, tuple[str, ...]]:
    saved: dict[str, tuple[str, ...]] = {}
    for key, module in model.named_modules():
        if not key or not name_match(key, specs):
            continue
        if any(key.startswith(p + ".") for p in saved):
            continue  # inside a module that is already saved whole
        if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(f"modules_to_save cannot be applied to modules of type {type(module).__name__} "
                            f"({key!r}); name the modules inside it instead.")
        saved[key] = tuple(n for n, _ in module.named_parameters())
    for spec in explicit:
        if not any(name_match(k, [spec]) for k in saved):
            warnings.warn(f"LoRA: modules_to_save entry {spec!r} matched no module; it is ignored.",
                          UserWarning, stacklevel=4)
    return saved


def _trained_biases(model, bias: str, targets, saved) -> dict[str, tuple[str, ...]]:
    if bias == "none":
        return {}
    if bias == "lora_only":
        paths = [t.module_path for t in targets.values() if getattr(t.module, "bias", None) is not None
                 and isinstance(t.module.bias, nn.Parameter)]
    else:
        paths = [name.rsplit(".", 1)[0] if "." in name else "" for name, _ in model.named_parameters()
                 if name == "bias" or name.endswith(".bias")]
    out = {}
    for p in paths:
        if p and not any(p == s or p.startswith(s + ".") for s in saved):
            out[p] = ("bias",)
    return out
