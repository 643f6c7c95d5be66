"""The one exception type for input a user can fix; every command reports it as one line (see `command.py`)."""


class ConfigError(ValueError):
    """Bad user input (recipe, command line, paths, files): reported as one line, exit status 2."""
