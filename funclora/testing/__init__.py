"""Tools for testing LoRA rules and models: the rule conformance check and hypothesis strategies.

* :func:`check_rule` (:mod:`funclora.testing.laws`): the laws every rule must keep, checked on one
  module; raises :class:`RuleCheckError` naming the first broken law.
* strategies (:mod:`funclora.testing.strategies`): modules, whole models, configs and adapters
  for hypothesis tests (needs ``hypothesis``, imported only when a strategy is called).
"""

from ..errors import RuleCheckError
from .check import RuleReport, check_rule
from .inputs import default_inputs, random_adapter
from .laws import LAWS
from .strategies import (Experts, ModelCase, ModuleCase, adapters, conv_cases, embedding_cases, expert_cases,
                         linear_cases, lora_configs, mha_cases, model_cases, module_cases, parameter_cases,
                         rnn_cases)

__all__ = [
    "LAWS",
    "Experts",
    "ModelCase",
    "ModuleCase",
    "RuleCheckError",
    "RuleReport",
    "adapters",
    "check_rule",
    "conv_cases",
    "default_inputs",
    "embedding_cases",
    "expert_cases",
    "linear_cases",
    "lora_configs",
    "mha_cases",
    "model_cases",
    "module_cases",
    "parameter_cases",
    "random_adapter",
    "rnn_cases",
]
