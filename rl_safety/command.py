"""The command boundary: how every `rl-safety` command reports bad input and interruptions.

A command's `main(argv)` raises `ConfigError` (or the reward stack's `RewardError`) for anything the user can
fix; `run_command` prints it as one line, `<prog>: error: <message>`, and returns exit status 2. Errors raised
inside libraries on user input (a model folder that does not load, a corrupt file) become the same kind of error
where the input is read (`load_error`). Anything else is a bug in rl_safety or a library and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
from collections.abc import Callable, Iterator

from safetensors import SafetensorError

from .errors import ConfigError, first_line
from .rewards.base import RewardError

# The reward stack keeps its own error type: plugins and `rewards/` do not depend on the commands.
INPUT_ERRORS = (ConfigError, RewardError)
# What libraries raise on a model or file a user named that is missing, truncated, of the wrong kind or shape.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
INTERRUPTED = 130  # the shell's status for SIGINT


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `ConfigError` line instead of usage + message + exit."""

    def error(self, message: str):
        raise ConfigError(message)

    def parse_args_strictly(
        self, argv: list[str] | None, *, intermixed: bool = False, stray: str | None = None
    ) -> argparse.Namespace:
        """`parse_args` where a value given to a yes/no flag, a stray value (`stray`: what the command takes
        instead; None lets it fall to the unknown-flag message) and an unknown flag (with a did-you-mean and the
        valid flags) are each one line."""
        switches = [flag for action in self._actions if action.nargs == 0 for flag in action.option_strings]
        for arg in argv or []:
            if arg.split("=")[0] in switches and "=" in arg:
                raise ConfigError(
                    f"{arg.split('=')[0]} takes no value (got {arg!r}): give the flag alone, or leave it out"
                )
        parse = self.parse_known_intermixed_args if intermixed else self.parse_known_args
        args, unknown = parse(argv)
        if not unknown:
            return args
        word = unknown[0].split("=")[0]
        if stray is not None and not word.startswith("-"):
            raise ConfigError(f"unexpected argument {unknown[0]!r}: {stray}")
        flags = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        close = difflib.get_close_matches(word, flags, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        valid = [
            action.option_strings[0] for action in self._actions if action.option_strings and action.dest != "help"
        ]
        raise ConfigError(f"unknown argument {word!r}{hint} (valid: {', '.join(valid)})")


def close_progress_bars() -> None:
    """Close bars an exception left open, so they do not redraw after the last message when the process exits."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def load_error(field: str, value: object, err: BaseException) -> ConfigError:
    """`field=value: cannot load (first line of the library's error)`: one error for every model or file load."""
    return ConfigError(f"{field}={value!r}: cannot load ({first_line(err)})")


@contextlib.contextmanager
def loading(field: str, value: object) -> Iterator[None]:
    """Around the load of one user-named model or file: a library's error becomes `load_error(field, value, err)`.
    Wrap the load alone, not the work after it, so a bug elsewhere keeps its traceback."""
    try:
        yield
    except INPUT_ERRORS:
        raise
    except LOAD_ERRORS as err:
        raise load_error(field, value, err) from err


def run_command(
    prog: str,
    main: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    resume_hint: str = "run the same command again to continue",
) -> int:
    """Run `main(argv)`; bad input → one line on stderr and exit 2, Ctrl-C → one line and exit 130."""
    try:
        return main(argv)
    except INPUT_ERRORS as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"{prog}: interrupted; {resume_hint}", file=sys.stderr)
        return INTERRUPTED
