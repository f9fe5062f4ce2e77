"""The one global table: which :class:`~funclora.Rule` serves which module type.

**Lookup order** (first hit wins): rules given to ``config.register_custom_module`` (checked
with ``isinstance``, in insertion order), then :func:`register_rule` (by MRO), then the built-ins
(by MRO). So a user rule for ``nn.Linear`` replaces the built-in one. Built in: ``nn.Linear``,
``nn.Embedding``, ``nn.Conv1d/2d/3d``, ``nn.MultiheadAttention``, transformers ``Conv1D``, and
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (QLoRA: the branch goes on the layer's output).

Custom rules are recorded in adapter files by name (``"module:QualName"``); :func:`recorded_rules`
turns such names back into rules, from modules that are already imported (a file never makes
funclora import code).
"""

from __future__ import annotations

import copy
import json
import sys
import warnings

from torch import nn

from ..errors import AdapterFileError, UnsupportedModuleError
from ._kinds import CONV1D, type_name
from .quantized import OUTPUT_RULE, OutputRule, for_quantized_weight
from .rules import (Conv1DRule, ConvRule, EmbeddingRule, LinearRule, MultiheadAttentionRule, ParameterRule, Rule,
                    _FactoredRule)

__all__ = ["register_rule", "unregister_rule", "find_rule", "supported_types", "as_rule", "behaves_as_builtin",
           "builtin_kind", "qualified_name", "recorded_rules", "rules_in_metadata", "with_rules",
           "user_rule_types"]

_BUILTIN: dict = {
    nn.Linear: LinearRule(),
    nn.Embedding: EmbeddingRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.MultiheadAttention: MultiheadAttentionRule(),
    CONV1D: Conv1DRule(),
    # bitsandbytes' quantized linears, by name (bitsandbytes is optional)
    "bitsandbytes.nn.modules.Linear4bit": OUTPUT_RULE,
    "bitsandbytes.nn.modules.Linear8bitLt": OUTPUT_RULE,
}
_USER: dict = {}

#: the built-in rule classes, and what a subclass must leave alone to behave as one
_BUILTIN_KINDS = (LinearRule, Conv1DRule, EmbeddingRule, ConvRule, MultiheadAttentionRule, ParameterRule, OutputRule)
_BEHAVIOUR = ("factors", "delta", "overlay", "updated_parameters", "_parts", "layout", "names", "file_key")


def builtin_kind(rule: Rule) -> type | None:
    """The built-in rule class ``rule`` is an instance of, if it changes none of its behaviour.

    A subclass that only renames itself or adds a ``check`` behaves as its base; one that
    overrides ``factors``, ``delta``, ``overlay`` (or the factored layout) does not.

    Example:
        >>> import funclora as fl
        >>> class Checked(fl.rules.LinearRule):
        ...     def check(self, module, r, path): pass
        >>> class Doubled(fl.rules.LinearRule):
        ...     def delta(self, module, factors, scaling): return {}
        >>> builtin_kind(Checked()).__name__, builtin_kind(Doubled()), builtin_kind(fl.ParameterRule("w")).__name__
        ('LinearRule', None, 'ParameterRule')
    """
    kind = type(rule)
    base = next((c for c in kind.__mro__ if c in _BUILTIN_KINDS), None)
    if base is None:
        return None
    if all(getattr(kind, name, None) is getattr(base, name, None) for name in _BEHAVIOUR):
        return base
    return None


def behaves_as_builtin(rule: Rule, *kinds: type) -> bool:
    """Whether ``rule`` behaves exactly as a built-in rule (one of ``kinds``, if given).

    Example:
        >>> import funclora as fl
        >>> behaves_as_builtin(fl.rules.LinearRule()), behaves_as_builtin(fl.rules.LinearRule(), fl.rules.ConvRule)
        (True, False)
    """
    kind = builtin_kind(rule)
    return kind is not None and (not kinds or issubclass(kind, kinds))


def is_factored(rule: Rule) -> bool:
    """Whether ``rule`` behaves as a built-in rule whose weight becomes a lazy ``LoraWeight``."""
    return behaves_as_builtin(rule, _FactoredRule)


def supported_types() -> list[str]:
    """Names of the module types that have a rule (built-in and registered).

    Example:
        >>> import funclora as fl
        >>> fl.rules.supported_types()[:3]
        ['torch.nn.Linear', 'torch.nn.Embedding', 'torch.nn.Conv1d']
    """
    names = [f"torch.nn.{t.__name__}" if isinstance(t, type) else t for t in _BUILTIN]
    return names + [type_name(t) for t in _USER]


def as_rule(rule, module_type=None) -> Rule:
    """Accept a :class:`Rule` instance or a ``Rule`` subclass (instantiated with no arguments)."""
    if isinstance(rule, type) and issubclass(rule, Rule):
        rule = rule()
    if not isinstance(rule, Rule):
        name = getattr(module_type, "__name__", module_type)
        raise TypeError(
            f"funclora: the rule for {name} must be a funclora.Rule (or a Rule subclass), got "
            f"{rule!r}. PEFT's LoraLayer classes do not apply here; write a Rule with factors() and "
            "delta() (see funclora.rules)."
        )
    return rule


def register_rule(module_type: type, rule) -> None:
    """Use ``rule`` for every module of ``module_type`` (and its subclasses), globally.

    Example:
        >>> import funclora as fl, torch.nn as nn
        >>> class MyLinear(fl.rules.LinearRule): pass
        >>> fl.register_rule(nn.Linear, MyLinear())
        >>> fl.unregister_rule(nn.Linear)
    """
    if not isinstance(module_type, type):
        raise TypeError(f"register_rule: `module_type` must be a class such as nn.LSTM, got {module_type!r}.")
    _USER[module_type] = as_rule(rule, module_type)


def unregister_rule(module_type: type) -> None:
    """Remove a rule added with :func:`register_rule` (built-ins stay).

    Example:
        >>> import funclora as fl, torch.nn as nn
        >>> fl.register_rule(nn.Linear, fl.rules.LinearRule())
        >>> fl.unregister_rule(nn.Linear)
        >>> fl.rules.find_rule(nn.Linear(2, 2))   # the built-in rule again
        LinearRule()
    """
    _USER.pop(module_type, None)


def user_rule_types() -> tuple[type, ...]:
    """The module types :func:`register_rule` has a rule for."""
    return tuple(_USER)


def find_rule(module: nn.Module, custom: dict | None = None) -> Rule | None:
    """The rule for ``module``: config rules, then registered rules, then built-ins; or None.

    Example:
        >>> import torch, funclora as fl
        >>> fl.rules.find_rule(torch.nn.Conv2d(3, 8, 3)), fl.rules.find_rule(torch.nn.LSTM(4, 8))
        (ConvRule(), None)
    """
    for module_type, rule in (custom or {}).items():
        if isinstance(module, module_type):
            return rule
    mro = type(module).__mro__
    for cls in mro:
        if cls in _USER:
            return _USER[cls]
    return builtin_rule(module)


def builtin_rule(module: nn.Module) -> Rule | None:
    """The built-in rule for ``module`` (by its type's MRO; an ``nn.Linear`` whose weight torchao
    quantized gets the output rule), ignoring registered rules."""
    for cls in type(module).__mro__:
        rule = _BUILTIN.get(cls) or _BUILTIN.get(type_name(cls))
        if rule is not None:
            return for_quantized_weight(module, rule)
    return None


# --- rules recorded by name in adapter files ----------------------------------------------------
def qualified_name(obj) -> str:
    """``"module:QualName"`` of a class: how adapter files record custom rules."""
    return f"{obj.__module__}:{obj.__qualname__}"


def _resolve(name: str):
    """The object named ``"module:QualName"``, from a module that is already imported."""
    module, _, qualname = name.partition(":")
    if not qualname or "<locals>" in qualname:
        raise LookupError(f"{name!r} is not an importable name (defined inside a function?)")
    if module not in sys.modules:
        raise LookupError(f"module {module!r} is not imported (funclora never imports code a file names)")
    obj = sys.modules[module]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def recorded_rules(entries: list[dict], known: set[str]) -> tuple[dict[type, Rule], list[tuple[str, str, str]]]:
    """Re-create the rules a file recorded: ``({module type: rule}, [(type name, rule name, why not)])``.

    ``entries`` are ``{"module_type": "pkg.mod:Type", "rule": "pkg.mod:Rule"}``; types in
    ``known`` (already served by a config or registered rule) are skipped.
    """
    known = known | {qualified_name(t) for t in _USER}
    added, failed = {}, []
    for entry in entries:
        type_name_, rule_name = entry["module_type"], entry["rule"]
        if type_name_ in known:
            continue
        try:
            module_type, rule_cls = _resolve(type_name_), _resolve(rule_name)
            if not (isinstance(module_type, type) and isinstance(rule_cls, type) and issubclass(rule_cls, Rule)):
                raise LookupError(f"{rule_name!r} is not a funclora.Rule subclass")
            added[module_type] = rule_cls()
        except Exception as e:  # noqa: BLE001 - any failure means: the user must register it
            failed.append((type_name_, rule_name, f"{type(e).__name__}: {e}"))
    return added, failed


def rules_in_metadata(meta: dict, file: str, fn: str) -> list[dict]:
    """The ``custom_rules`` entries of a safetensors file's ``"funclora"`` metadata."""
    try:
        info = json.loads(meta.get("funclora", "{}"))
        rules = info.get("custom_rules", [])
        if not all(isinstance(r, dict) and isinstance(r.get("module_type"), str) and isinstance(r.get("rule"), str)
                   for r in rules):
            raise ValueError("malformed custom_rules")
    except (ValueError, AttributeError, TypeError) as e:
        raise AdapterFileError(f"{fn}: {file!r} has unreadable funclora metadata ({e}). Save it again.") from None
    return rules


def with_rules(config, rules: list[dict], *, required: bool, file: str, fn: str):
    """``config`` with the file's custom rules registered (a copy when anything is added).

    A rule that cannot be re-created raises (``required``) or warns, naming the rule to register.
    """
    added, failed = recorded_rules(rules, {qualified_name(t) for t in config._custom_modules})
    for failed_type, rule_name, why in failed:
        msg = (f"{fn}: {file!r} was saved with the custom rule {rule_name} for modules of type {failed_type}, "
               f"which cannot be re-created here ({why}). Register it before loading: "
               f"config = fl.LoraConfig.from_pretrained(path); config.register_custom_module({{"
               f"{failed_type.rpartition(':')[2]}: {rule_name.rpartition(':')[2]}()}}); then pass config=config.")
        if required:
            raise UnsupportedModuleError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    if not added:
        return config
    config = copy.copy(config)
    config._custom_modules = dict(config._custom_modules)
    config.register_custom_module(added)
    return config
