"""funclora: LoRA on any PyTorch model without mutating it, built on ``torch.func``.

An adapter is a plain pytree ``{module path: {leaf: Tensor}}``; the forward is a pure function
of (base params, adapter, inputs), so ``grad``, ``vmap`` and ``torch.compile`` compose with it.
The testing kit (``funclora.testing``) is imported only when you import it.
"""

from . import distributed, io, rules
from ._version import __version__
from .core.config import LoraConfig
from .core.lazy import MaterializationError, strict
from .core.pytree import select, stack, unstack
from .core.registry import register_rule, unregister_rule
from .core.rules import Factor, ParameterRule, Rule
from .core.suggest import LayerGroup, TargetSuggestion, suggest_targets
from .core.targeting import Plan, Target
from .errors import (AdapterFileError, AdapterMismatchError, RuleCheckError, TargetNotFoundError,
                     UnsupportedModuleError)
from .io import load_adapter, load_adapters, save_adapter
from .lora import LoRA
from .peft_compat import PeftModel, get_peft_model

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "Factor",
    "LayerGroup",
    "LoRA",
    "LoraConfig",
    "MaterializationError",
    "ParameterRule",
    "PeftModel",
    "Plan",
    "Rule",
    "RuleCheckError",
    "Target",
    "TargetNotFoundError",
    "TargetSuggestion",
    "UnsupportedModuleError",
    "distributed",
    "get_peft_model",
    "load_adapter",
    "load_adapters",
    "register_rule",
    "rules",
    "save_adapter",
    "select",
    "stack",
    "strict",
    "suggest_targets",
    "unregister_rule",
    "unstack",
]
