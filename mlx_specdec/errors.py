"""The one exception type users see: a message that says what was wrong and how to fix it."""


class SpecDecError(Exception):
    """Bad input (model, drafter, flag, request). The CLI prints it as one line, no traceback."""
