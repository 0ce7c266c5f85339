"""The one exception base of cnnlab: `CnnlabError` carries the exit code the CLI returns for it.

Bad input (a config, an argument, a file, a data set) derives from `InputError` and exits 2; a run
that fails on good input (a refused checkpoint, a non-finite loss, failed study variations) derives
from `RunError` and exits 1. Each module keeps its own subclasses (config.ConfigError,
training.checkpoint.CheckpointError, ...), also deriving from the builtin they always were
(ValueError, RuntimeError, ...) so that `except ValueError` around them keeps working.
A leaf: imports nothing.
"""
from __future__ import annotations


class CnnlabError(Exception):
    """Anything cnnlab refuses or fails at on purpose; `cli.main` prints `cnnlab: <label>: <message>`."""

    exit_code = 1
    label = "error"  # the word before the message on stderr; "" for none

    def __str__(self) -> str:  # a KeyError subclass would otherwise print its message quoted
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(CnnlabError):
    """Bad input: the message names the file, key or value and what to do. Exit code 2."""

    exit_code = 2


class RunError(CnnlabError):
    """A run that failed on valid input (nothing already written is lost). Exit code 1."""

    exit_code = 1


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an exception cnnlab expects, or None for a bug (the CLI shows its traceback).

    Builtin OSError / ValueError / KeyError raised by the libraries below (a missing file, a corrupt
    image, a zip that is not one) are bad input too: exit 2.
    """
    if isinstance(exc, CnnlabError):
        return exc.exit_code
    if isinstance(exc, (OSError, ValueError, KeyError)):
        return InputError.exit_code
    return None


def message(exc: BaseException) -> str:
    """`cnnlab: <label>: <message>` for stderr."""
    label = exc.label if isinstance(exc, CnnlabError) else "error"
    text = exc.args[0] if isinstance(exc, KeyError) and not isinstance(exc, CnnlabError) and exc.args else exc
    return f"cnnlab: {label + ': ' if label else ''}{text}"
