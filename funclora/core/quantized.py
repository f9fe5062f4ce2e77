"""LoRA on quantized layers (QLoRA): the branch is added to the layer's output.

A bitsandbytes ``Linear4bit`` (nf4 / fp4) or ``Linear8bitLt`` keeps its weight as packed integers
that only its own forward decodes, and a torchao-quantized ``nn.Linear`` holds a tensor subclass
that ``F.linear`` dispatches on; either way there is no dense ``W`` to put a lazy
``W (+) s·B@A`` in. :class:`OutputRule` adds the LoRA branch to what the layer returns, as PEFT's
``lora.bnb.Linear4bit`` / ``Linear8bitLt`` / ``TorchaoLoraLinear`` do::

    y = layer(x) + (s · B(A(drop(x.to(A.dtype))))).to(y.dtype)

The call's view of the layer (funclora/core/shadow.py) is an instance of :func:`output_view` of its
class, so the user's layer stays untouched and no dequantized copy of its weight is made.
Factors are float32 by default (PEFT's too); the branch runs in the factors' dtype.

bitsandbytes repacks a ``Linear4bit``'s weight in place on CPUs with AVX512-BF16, the first time
the layer runs in eval mode without gradients (its kernel then computes in bf16). funclora's
calls never trigger that: the view runs the layer with its own train flag set. The user's own
``model(x)`` still may, and then every later call, funclora's and PEFT's, uses the repacked
weight.

Only an eager call builds views: ``torch.compile`` (which traces ``functional_call``), FSDP2 and
``merge`` / ``delta`` cannot place this branch, and each raises, naming the layer. Under
``torch.func`` transforms a ``Linear8bitLt`` is computed as its CPU kernel computes it (from the
dequantized weight, a temporary of the call): bitsandbytes' own autograd.Function cannot be vmapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dora import dora_scale, weight_norm
from .dora_forward import DoraParts, combine, scaled_rows
from .lazy import LoraParts, _add_product, _lora_a
from .rules import Factor, LinearRule, Rule

__all__ = ["OutputRule", "OUTPUT_RULE", "output_view", "for_quantized_weight", "dequantized_weight"]


class OutputRule(Rule):
    """LoRA on a linear layer whose weight is quantized: ``lora_A (r, in)``, ``lora_B (out, r)``.

    The branch is added to the layer's output (see the module docstring); ``merge`` refuses.

    Example:
        >>> import torch
        >>> from funclora.core.quantized import OutputRule
        >>> OutputRule().factors(torch.nn.Linear(4, 3), 2)["lora_B"].shape
        (3, 2)
    """

    supports_dropout = True
    names = ("lora_A", "lora_B")

    def updated_parameters(self, module):
        return ()

    def factors(self, module, r):
        return {"lora_A": Factor((r, module.in_features), "A"), "lora_B": Factor((module.out_features, r), "B")}

    def delta(self, module, factors, scaling):
        raise NotImplementedError(
            f"{type(module).__name__} keeps its weight quantized; merging would mean dequantizing it, adding "
            "s·B@A and quantizing again, which funclora does not do yet. Run the adapter unmerged "
            "(lora(adapter, x)), or merge into an unquantized copy of the model.")

    def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
        raise NotImplementedError(
            f"LoRA: {path!r} ({type(module).__name__}) gets its LoRA branch on its output, which only an eager "
            "call places (on the call's view of the model); torch.compile, FSDP2 and explicit overlays "
            "cannot. Call lora(adapter, x) eagerly for this model.")


def output_view(cls: type) -> type:
    """The class of a call's view of a ``cls`` layer: its own forward, plus the LoRA branch.

    The view's ``_view_state`` is the :class:`~funclora.core.lazy.LoraParts` (``base`` unused),
    or :class:`~funclora.core.dora_forward.DoraParts` for DoRA (``base`` unused: the norm comes
    from the dequantized weight, as PEFT's, a temporary of the call).
    """
    view = _VIEWS.get(cls)
    if view is None:
        base_forward = cls.forward

        def forward(self, x, *args, **kwargs):
            parts: LoraParts = self.__dict__["_view_state"]
            if not self.training and getattr(self, "support_avx512bf16_for_cpu", False):
                # bitsandbytes repacks a Linear4bit's weight in place, for AVX512-BF16 CPUs, on an eval
                # forward without gradients; this flag lives on the call's view, so a funclora call
                # never does that to the user's layer (its own model(x) still may)
                self.__dict__["training"] = True
            own = self.__dict__.get("_own_forward")   # an instance forward (e.g. accelerate's hook) runs the layer
            if own is not None:
                result = own(x, *args, **kwargs)
            elif _in_transform() and type(self.weight).__name__ == "Int8Params" and not args and not kwargs:
                result = _int8_dequantized_linear(self, x)   # bitsandbytes' int8 Function cannot run under vmap
            else:
                result = base_forward(self, x, *args, **kwargs)
            if type(parts) is DoraParts:
                return _dora_output(self, x, result, parts)
            if not torch.is_grad_enabled():  # inference: the update is added into the layer's fresh output
                return _add_product(result, _lora_a(x, parts), parts.B, parts.scaling)
            update = F.linear(_lora_a(x, parts), parts.B) * parts.scaling   # PEFT's formula
            return result + (update if update.dtype == result.dtype else update.to(result.dtype))

        view = _VIEWS[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "forward": forward,
            "wraps_own_forward": True})
    return view


_VIEWS: dict[type, type] = {}


def _in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _dora_output(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, p: DoraParts) -> torch.Tensor:
    """PEFT's DoRA on a quantized linear (``peft.tuners.lora.bnb`` + ``DoraLinearLayer``): the layer's
    output ``result`` rescaled per output channel by ``m / ‖W_deq + s·BA‖``, plus the scaled branch."""
    weight = dequantized_weight(layer).to(p.A.dtype)
    scale = dora_scale(p.magnitude, weight_norm(weight, p.A, p.B, p.scaling, "linear"))
    x_dropped = F.dropout(x, p.dropout, True) if p.dropout else None
    h = (x if x_dropped is None else x_dropped).to(p.A.dtype)
    lora = F.linear(F.linear(h, p.A) * p.scaling, scaled_rows(p.B, scale))
    dropped = None if x_dropped is None else F.linear(x_dropped.to(weight.dtype), weight)
    return combine(result, lora, scale, layer.bias, base_dropped=dropped)


def dequantized_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a quantized linear (bitsandbytes 4-/8-bit, torchao), a new tensor.

    An 8-bit weight is computed in ``dtype`` as bitsandbytes' CPU kernel does (``CB·SCB/127``);
    the others come in their library's dtype.
    """
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    if type(weight).__name__ == "Int8Params":
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # moved there by a forward
        return weight.data.to(dtype) * (scales.to(dtype)[:, None] / 127)
    if hasattr(weight, "dequantize"):
        return weight.dequantize()
    return weight.detach()


def _int8_dequantized_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes ``Linear8bitLt`` computed as its CPU kernel does, ``x @ (CB·SCB/127)ᵀ + b``.

    Its autograd.Function has no ``setup_context``, so torch.func cannot run it; the dense weight
    made here is a temporary of this call.
    """
    return F.linear(x, dequantized_weight(layer, x.dtype), layer.bias)


def for_quantized_weight(module: nn.Module, rule: Rule | None) -> Rule | None:
    """``rule``, or :class:`OutputRule` for an ``nn.Linear`` (built-in rule) whose weight torchao quantized.

    torchao's ``quantize_`` keeps the layer an ``nn.Linear`` and makes its weight a tensor subclass
    (``Int8Tensor``, ``NF4Tensor``, ...) that ``F.linear`` dispatches on: the branch goes on the output.
    """
    if type(rule) is not LinearRule:
        return rule
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and type(weight).__module__.split(".")[0] == "torchao":
        return OUTPUT_RULE
    return rule


#: the one OutputRule instance: the registry serves it for bitsandbytes layers, for_quantized_weight for torchao
OUTPUT_RULE = OutputRule()
