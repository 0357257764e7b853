"""The library's version (one place: the package, checkpoint metadata and the CLI read it)."""

__version__ = "0.1.0"
