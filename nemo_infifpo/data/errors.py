"""Errors in what a user gave a stage (data, templates, options, paths), and how entry points
report them: one line (or one paragraph) on stderr naming the file, row, key and what was
expected, exit status 1, no traceback. A traceback is for bugs in this package; a bad input is
the user's to fix, and they should not have to dig for the message.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["ConfigError", "InputError", "exit_on_input_error", "input_error_types"]

EXIT_INPUT_ERROR = 1


class InputError(ValueError):
    """A problem with the inputs of a stage, explained by its message alone."""


class ConfigError(InputError):
    """An option with a missing, unknown or invalid value; the message names the key."""


def input_error_types(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story for the user."""
    from nemo_infifpo.models import errors as model_errors

    model_types = tuple(
        value
        for value in vars(model_errors).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == model_errors.__name__
    )
    # Missing paths, files where directories belong, read-only outputs: the OS message names
    # the path, which is what the user needs.
    os_types = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
    return (InputError, *model_types, *os_types, *extra)


@contextlib.contextmanager
def exit_on_input_error(*extra: type[BaseException], stage: str = "") -> Iterator[None]:
    """Run a stage; an input error becomes ``error: <message>`` on stderr and exit status 1.

    ``extra``: further exception types a stage treats as input errors."""
    try:
        yield
    except input_error_types(*extra) as error:
        logging.shutdown()
        prefix = f"{stage}: " if stage else ""
        print(f"error: {prefix}{_message(error)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INPUT_ERROR) from None


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return str(error) or type(error).__name__
