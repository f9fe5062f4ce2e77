"""Modules, inputs and adapters for rule checks: what :func:`~funclora.testing.check_rule` runs on."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..core._kinds import is_conv1d
from ..core.config import LoraConfig
from ..core.rules import ParameterRule, Rule
from ..lora import LoRA

__all__ = ["default_inputs", "random_adapter", "build_module", "host_config", "resolve_inputs"]


def build_module(module_factory, seed: int) -> nn.Module:
    if isinstance(module_factory, nn.Module):
        return copy.deepcopy(module_factory)
    if not callable(module_factory):
        raise TypeError(f"check_rule: `module_factory` must be a callable returning an nn.Module (or a "
                        f"module), got {type(module_factory).__name__}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = module_factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"check_rule: `module_factory()` must return an nn.Module, got {type(module).__name__}.")
    return module


def host_config(module: nn.Module, rule: Rule, r: int) -> LoraConfig:
    if type(rule) is ParameterRule:
        return LoraConfig(target_parameters=[f"layer.{rule.name}"], r=r, lora_alpha=2 * r)
    config = LoraConfig(target_modules=["layer"], r=r, lora_alpha=2 * r)
    config.register_custom_module({type(module): rule})
    return config


def resolve_inputs(module, inputs, seed):
    if inputs is None:
        return default_inputs(module, torch.Generator().manual_seed(seed))
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        inputs = inputs(module)
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def default_inputs(module: nn.Module, generator: torch.Generator | None = None) -> tuple:
    """Example forward arguments for the built-in module types and LSTM / GRU / RNN, or the
    module's own ``example_inputs(generator)`` (a tuple) when it has one.

    Example:
        >>> import torch
        >>> from funclora.testing import default_inputs
        >>> [tuple(x.shape) for x in default_inputs(torch.nn.Linear(4, 3))]
        [(3, 4)]
    """
    g = generator
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    if isinstance(module, nn.Linear):
        return (randn(3, module.in_features),)
    if isinstance(module, nn.Embedding):
        return (_ids(module, g),)
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        pads = module.padding if isinstance(module.padding, tuple) else (0,) * len(module.kernel_size)
        sizes = [d * (k - 1) + 1 + s + p + 1 for k, s, d, p in
                 zip(module.kernel_size, module.stride, module.dilation, pads)]
        return (randn(2, module.in_channels, *sizes),)
    if isinstance(module, nn.MultiheadAttention):
        shape = (2, 5) if module.batch_first else (5, 2)
        return (randn(*shape, module.embed_dim), randn(*shape, module.kdim), randn(*shape, module.vdim))
    if isinstance(module, nn.RNNBase):
        return (randn(3, 5, module.input_size),)
    if is_conv1d(module):
        return (randn(2, 3, module.weight.shape[0]),)
    if callable(getattr(module, "example_inputs", None)):
        return tuple(module.example_inputs(g))
    raise TypeError(f"check_rule: cannot guess the inputs of a {type(module).__name__}; pass "
                    "inputs=(tensor, ...) or inputs=lambda module: (...), or give the module an "
                    "example_inputs(generator) method.")


def _ids(module: nn.Embedding, g) -> torch.Tensor:
    """Token ids ``(2, 6)`` that avoid ``padding_idx``: there the factored lookup (as PEFT's) still
    gives ``lora_embedding_B`` a gradient, the merged weight does not (both are zero while
    ``lora_embedding_A``'s padding column is zero, as it is at init)."""
    ids = torch.randint(0, module.num_embeddings, (2, 6), generator=g)
    if module.padding_idx is not None and module.num_embeddings > 1:
        pad = module.padding_idx % module.num_embeddings
        ids = torch.where(ids == pad, (pad + 1) % module.num_embeddings, ids)
    return ids


def random_adapter(lora: LoRA, *, seed: int = 0, scale: float = 1.0) -> dict:
    """An adapter of ``lora``'s shapes with every leaf random and non-zero.

    Each leaf is N(0, 1) divided by the square root of its fan (the product of all but its
    first size), times ``scale``, so that ``s·ΔW`` is of the order of the weights.

    Example:
        >>> import torch, funclora as fl
        >>> from funclora.testing import random_adapter
        >>> lora = fl.LoRA(torch.nn.Sequential(torch.nn.Linear(4, 3)), fl.LoraConfig(target_modules=["0"], r=2))
        >>> adapter = random_adapter(lora, seed=1)
        >>> tuple(adapter["0"]["lora_B"].shape), bool(adapter["0"]["lora_B"].abs().min() > 0)
        ((3, 2), True)
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, leaves in lora.shapes().items():
        dtype = _leaf_dtype(lora, path)
        out[path] = {leaf: (scale * torch.randn(shape, generator=g) / math.sqrt(max(1, math.prod(shape[1:]))))
                     .to(dtype) for leaf, shape in leaves.items()}
    return out


def _leaf_dtype(lora, path):
    t = lora.plan.targets.get(path)
    if t is None:
        return torch.float32
    w = t.module.get_parameter(t.rule.updated_parameters(t.module)[0])
    return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
