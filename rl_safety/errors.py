"""The one exception type for input a user can fix; every command reports it as one line (see `command.py`)."""


class ConfigError(ValueError):
    """Bad user input (recipe, command line, paths, files): reported as one line, exit status 2."""


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line, or its type when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
