"""The application's error types: a run that cannot start, a run folder that cannot be read.
The command line turns either into exit status 2 and its one-line message."""


class ConfigError(ValueError):
    """The run cannot start as configured (data folder missing or malformed, device not
    available, output folder not writable); the message says why and what to pass instead."""


class RunFileError(ValueError):
    """A file of a run folder is missing or malformed (empty, binary, truncated, unexpected
    columns or values); the message names the file and what is wrong with it."""
