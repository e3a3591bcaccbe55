"""Exceptions with a user-facing message, and the exit codes the CLI maps outcomes to."""

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class DiffPluginError(Exception):
    """A usage or configuration problem: the run cannot start (exit code 2)."""


class ModelNotFoundError(DiffPluginError):
    """A base model, image encoder or plugin could not be found or loaded."""


class ImageError(Exception):
    """One input image cannot be processed; the batch goes on without it."""
