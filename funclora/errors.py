"""The errors funclora raises on bad input. All are ``ValueError`` subclasses.

Each message names the function, the module path or file key, what was expected, what was
found, and the fix.
"""

from __future__ import annotations

__all__ = ["TargetNotFoundError", "UnsupportedModuleError", "AdapterMismatchError", "AdapterFileError",
           "RuleCheckError"]


class TargetNotFoundError(ValueError):
    """No module (or parameter) of the model matches the config's targets.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> fl.LoRA(model, fl.LoraConfig(target_modules=["fc"]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        funclora.errors.TargetNotFoundError: LoRA: Target modules ['fc'] not found in the base model Sequential ...
    """


class UnsupportedModuleError(ValueError):
    """A targeted module's type has no LoRA rule.

    Example:
        >>> import torch, funclora as fl
        >>> model = torch.nn.Sequential(torch.nn.LSTM(4, 8))
        >>> fl.LoRA(model, fl.LoraConfig(target_modules=["0"]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        funclora.errors.UnsupportedModuleError: LoRA: target '0' is a torch.nn.modules.rnn.LSTM ...
    """


class AdapterMismatchError(ValueError):
    """An adapter's keys or shapes do not fit the model (or the file does not fit the config).

    Example:
        >>> import torch, funclora as fl
        >>> lora = fl.LoRA(torch.nn.Sequential(torch.nn.Linear(4, 2)), fl.LoraConfig(target_modules=["0"], r=2))
        >>> adapter = {"0": {"lora_A": torch.zeros(3, 4), "lora_B": torch.zeros(2, 3)}}  # made with r=3
        >>> lora(adapter, torch.randn(1, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        funclora.errors.AdapterMismatchError: LoRA: adapter['0']['lora_A'] has shape (3, 4) but the model's 0 needs (2, 4)...
    """


class AdapterFileError(ValueError):
    """An adapter file is unreadable: empty, truncated, not safetensors / JSON, or not a LoRA config.

    Example:
        >>> import os, tempfile, funclora as fl
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        ...         _ = f.write("{not json")
        ...     fl.load_adapter(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        funclora.errors.AdapterFileError: load_adapter: ...
    """


class RuleCheckError(ValueError):
    """A rule broke one of :func:`check_rule`'s laws; ``law`` names it, the message says how.

    Example:
        >>> import torch, funclora as fl
        >>> from funclora.testing import RuleCheckError, check_rule
        >>> class NoScaling(fl.rules.LinearRule):    # forgets to multiply the update by `scaling`
        ...     def delta(self, module, factors, scaling):
        ...         return {"weight": factors["lora_B"] @ factors["lora_A"]}
        >>> try:
        ...     check_rule(lambda: torch.nn.Linear(4, 3), NoScaling())
        ... except RuleCheckError as e:
        ...     print(e.law)
        well-formed
    """

    def __init__(self, law: str, subject: str, message: str):
        super().__init__(f"check_rule: law {law!r} is broken for {subject}: {message}")
        self.law = law
