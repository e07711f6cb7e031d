"""User-facing errors. The CLI prints these as one line and exits non-zero, without a traceback."""


class MulosdError(ValueError):
    """A bad input or an inconsistent file, described in a message that names the value and what is allowed."""
