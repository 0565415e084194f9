"""User-facing errors. Anything raised as a `MoekitError` reaches a CLI user as one clear line
(no traceback); its message must say what is wrong and how to fix it."""


class MoekitError(Exception):
    """Base class for errors caused by user input (configs, files, flags, data)."""
