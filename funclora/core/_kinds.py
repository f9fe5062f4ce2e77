"""One answer to "what is this module?" and "does this module name match that entry?".

Every file that asks whether a module is a transformers ``Conv1D``, a linear layer or a
transformers model, or whether a module path matches a ``target_modules`` entry, asks here.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["CONV1D", "is_conv1d", "is_linear", "is_pretrained", "join", "name_match", "type_name"]

#: transformers' GPT-2 style linear layer (weight stored ``(in, out)``), by qualified name:
#: transformers is never imported to answer
CONV1D = "transformers.pytorch_utils.Conv1D"


def type_name(cls: type) -> str:
    """``"package.module.Qualname"`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_conv1d(module: nn.Module | type) -> bool:
    """Whether ``module`` (or a class) is a transformers ``Conv1D`` or a subclass of it.

    Example:
        >>> import torch
        >>> is_conv1d(torch.nn.Linear(2, 2)), is_conv1d(torch.nn.Linear)
        (False, False)
    """
    cls = module if isinstance(module, type) else type(module)
    return any(type_name(c) == CONV1D for c in cls.__mro__)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers ``Conv1D``: the layers ``"all-linear"`` means."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def name_match(key: str, spec) -> str | None:
    """How module path ``key`` matches ``spec``, PEFT's rule: ``"exact"``, ``"suffix"`` or None.

    ``spec`` is a regex (``re.fullmatch`` on the whole path) or a list of names; a name matches
    the path itself or its end after a dot.

    Example:
        >>> name_match("layers.0.q_proj", ["q_proj"]), name_match("q_proj", ["q_proj"])
        ('suffix', 'exact')
        >>> name_match("layers.0.xq_proj", ["q_proj"]), name_match("layers.0.q_proj", r".*\\.0\\.q_proj")
        (None, 'exact')
    """
    if isinstance(spec, str):
        return "exact" if re.fullmatch(spec, key) else None
    if key in spec:
        return "exact"
    if any(key.endswith("." + n) for n in spec):
        return "suffix"
    return None


def join(prefix: str, name: str) -> str:
    """A dotted path: ``join("a.b", "c") == "a.b.c"``; an empty side is left out."""
    return f"{prefix}.{name}" if prefix and name else prefix or name
