"""Errors that are the user's to fix: reported as one line, without a traceback."""


class ConfigError(ValueError):
    """A mistake in the configuration or the inputs, with what is wrong and how to fix it."""
