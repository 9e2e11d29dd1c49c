"""The one error type users see: a one-line message, exit code 2 from the CLI."""


class MedclfError(Exception):
    """A problem with the user's input or environment, explained in one line."""
