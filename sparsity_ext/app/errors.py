"""The application's one error type for a run that cannot start as configured."""


class ConfigError(ValueError):
    """The run cannot start as configured (data folder missing or malformed, device not
    available, output folder not writable); the message says why and what to pass instead."""
