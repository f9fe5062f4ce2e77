"""The package version (one place: io writes it into every adapter file's metadata)."""

__version__ = "0.1.0"
