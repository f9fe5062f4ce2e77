"""Checks of one target before it is planned: each raises naming the module and the fix.

A parametrized weight, a weight that is not a dense float tensor (GPTQ / AWQ / integer packs)
for a built-in overlay, and ``use_dora=True`` where neither PEFT nor funclora has a DoRA form.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UnsupportedModuleError
from .quantized import OutputRule
from .registry import is_factored
from .rules import MultiheadAttentionRule, ParameterRule, Rule, overlay_is_builtin

__all__ = ["check_not_parametrized", "check_dense_weights", "check_dora"]


def check_not_parametrized(module: nn.Module, rule, path: str) -> None:
    """LoRA adapts a weight stored as a plain parameter; a parametrized one is computed per call."""
    names = [n for n in rule.updated_parameters(module) if parametrize.is_parametrized(module, n)]
    if names:
        raise UnsupportedModuleError(
            f"LoRA: target {path!r} has a parametrized {names[0]!r} (torch.nn.utils.parametrize, e.g. "
            "weight_norm or spectral_norm): it is computed on every call, not stored as a plain "
            "parameter, so there is no weight for LoRA to adapt. Remove the parametrization first "
            f"(torch.nn.utils.parametrize.remove_parametrizations(module, {names[0]!r})) or leave the "
            "layer out (exclude_modules)."
        )


def check_dense_weights(module: nn.Module, rule, path: str) -> None:
    """A built-in rule adapts a dense floating-point weight; a quantized or packed one would be misread.

    GPTQ / AWQ / HQQ layers and the like keep ``nn.Linear``'s class or a subclass, but their weight
    is integer data (``int32`` / ``uint8`` / packed) or a tensor subclass that the layer's own
    forward decodes. (bitsandbytes layers and torchao-quantized ``nn.Linear`` have an
    :class:`~funclora.core.quantized.OutputRule` by now, whose overlay is not a built-in one.)
    """
    if not overlay_is_builtin(rule):
        return  # a user rule reads the weights its own way
    for name in rule.updated_parameters(module):
        weight = module.get_parameter(name) if "." in name else getattr(module, name)
        kind = type(weight)
        plain = kind.__torch_dispatch__ is torch.Tensor.__torch_dispatch__ or _is_dtensor(weight)
        if plain and weight.dtype.is_floating_point and weight.layout == torch.strided:
            continue
        what = f"a {kind.__module__}.{kind.__qualname__} of dtype {weight.dtype}"
        raise UnsupportedModuleError(
            f"LoRA: target {path!r} ({type(module).__module__}.{type(module).__qualname__}) stores its "
            f"{name!r} as {what}, not as a dense floating-point tensor: it is quantized or packed "
            "(bitsandbytes, torchao, GPTQ, AWQ, HQQ, ...), and funclora's built-in rules would misread "
            "it. funclora's quantized rules cover bitsandbytes Linear4bit / Linear8bitLt and torchao-quantized "
            "nn.Linear only: leave the layer out "
            "(exclude_modules), load the model unquantized, or register a rule for "
            f"{type(module).__qualname__} (fl.register_rule) whose overlay adds the LoRA branch its own way."
        )


def _is_dtensor(t) -> bool:
    """A DTensor (an FSDP2 shard of a dense weight), without importing torch.distributed."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def check_dora(module: nn.Module, rule: Rule, path: str) -> None:
    """Refuse ``use_dora=True`` where PEFT refuses it, or where funclora has no DoRA forward."""
    if isinstance(rule, ParameterRule):
        raise UnsupportedModuleError(
            f"LoRA: use_dora=True with target_parameters ({path!r}): PEFT refuses this too ('lora.ParamWrapper "
            "does not work with use_dora=True'). Set use_dora=False, or target the module instead.")
    if isinstance(rule, MultiheadAttentionRule):
        raise UnsupportedModuleError(
            f"LoRA: {path!r} is an nn.MultiheadAttention, and PEFT has no DoRA for it ('MultiheadAttention does "
            "not support DoRA (yet), please set use_dora to False'); neither has funclora. Exclude it "
            f"(exclude_modules=[{path!r}]) or set use_dora=False.")
    if not is_factored(rule) and not isinstance(rule, OutputRule):
        raise UnsupportedModuleError(
            f"LoRA: use_dora=True, but {path!r} ({type(module).__name__}) uses the rule {rule!r}, which has no "
            "DoRA form: DoRA is built in for nn.Linear, nn.Embedding, nn.Conv1d/2d/3d and transformers Conv1D "
            "with their built-in rules, and quantized linears. Set use_dora=False or exclude this module.")
