"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class FmnError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
