"""The errors funclora raises on bad input. All are ``ValueError`` subclasses.

Each message names the function, the module path or file key, what was expected, what was
found, and the fix.
"""

from __future__ import annotations

__all__ = ["TargetNotFoundError", "UnsupportedModuleError", "AdapterMismatchError", "AdapterFileError"]


class TargetNotFoundError(ValueError):
    """No module (or parameter) of the model matches the config's targets."""


class UnsupportedModuleError(ValueError):
    """A targeted module's type has no LoRA rule."""


class AdapterMismatchError(ValueError):
    """An adapter's keys or shapes do not fit the model (or the file does not fit the config)."""


class AdapterFileError(ValueError):
    """An adapter file is unreadable: empty, truncated, not safetensors / JSON, or not a LoRA config."""
