"""Exceptions with a user-facing message; the CLI maps them to exit codes."""


class DiffPluginError(Exception):
    """A usage or configuration problem: the run cannot start (exit code 2)."""


class ModelNotFoundError(DiffPluginError):
    """A base model, image encoder or plugin could not be found or loaded."""


class ImageError(Exception):
    """One input image cannot be processed; the batch goes on without it."""
