"""funclora: LoRA on any PyTorch model without mutating it, built on ``torch.func``.

An adapter is a plain pytree ``{module path: {leaf: Tensor}}``; the forward is a pure function
of (base params, adapter, inputs), so ``grad``, ``vmap`` and ``torch.compile`` compose with it.
"""

from . import distributed, rules
from .apply import LoRA
from .config import LoraConfig
from .errors import AdapterFileError, AdapterMismatchError, TargetNotFoundError, UnsupportedModuleError
from .io import load_adapter, load_adapters, save_adapter
from .lazy import MaterializationError, strict
from .ops import select, stack, unstack
from .peft_compat import PeftModel, get_peft_model
from .rules import Factor, ParameterRule, Rule, register_rule, unregister_rule
from .suggest import LayerGroup, TargetSuggestion, suggest_targets
from .targeting import Plan, Target
from .testing import RuleCheckError

__version__ = "0.1.0"

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
