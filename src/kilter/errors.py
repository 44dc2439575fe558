"""User-facing errors. Each carries a one-line message; the CLI prints it and exits with 2."""


class KilterError(Exception):
    """Base for problems with the user's input (config, data file, request, model folder)."""


class ConfigError(KilterError, ValueError):
    """A configuration key is unknown, of the wrong type, out of range, or names a missing file."""


class DataError(KilterError, ValueError):
    """A data file or row is malformed; the message names the file, line and field."""
