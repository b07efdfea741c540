"""The `cdc` Typer app and what every command shares: thin Typer commands, each parsing options and calling one library function.

No tensor code lives here, and the library never imports typer. Library errors that are the
user's to fix (ConfigError, ValueError from bad input, and OSError such as FileNotFoundError)
become one-line messages with exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from cdc import __version__


def _flags_show_no_value(params: list[Any]) -> None:
    """Typer prints `<bool>` after a flag, which reads as if `--stages true` were accepted: blank it."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""


class _FlagsShowNoValue:
    """Mixed into the command and group classes: flags show no value in --help (_flags_show_no_value)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _flags_show_no_value(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        opt = super().get_help_option(ctx)
        _flags_show_no_value([opt] if opt is not None else [])
        return opt


class _Command(_FlagsShowNoValue, TyperCommand):
    """A `cdc` command."""


class _Group(_FlagsShowNoValue, TyperGroup):
    """The `cdc` group."""


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="CDC-FM: coarse-to-fine pixel-space flow matching with one unified DiT.",
    epilog="""Examples (the quickstart: Fashion-MNIST on a CPU, minutes):
cdc prepare --src fashion-mnist
cdc train recipes/quickstart.yaml
cdc sample --ckpt runs/quickstart -n 64

Each command's --help shows examples and where every default comes from.""",
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """Raised by the library for bad input; the CLI prints it as one line."""


# this invocation's notes on old option spellings (_renamed): printed once it has finished, or
# appended to its error line, so an error stays one line
_notes: list[str] = []


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-input errors from the library into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cdc.config import ConfigError

        _notes.clear()
        try:
            result = fn(*args, **kwargs)
        except (ConfigError, UserError, ValueError, OSError) as e:  # OSError: missing/unreadable files
            from cdc.fileio import one_line

            msg = one_line(e).encode("utf-8", "backslashreplace").decode("utf-8")  # names may be bytes
            typer.echo(f"error: {msg}" + "".join(f" (note: {n})" for n in _notes), err=True)
            raise typer.Exit(2) from None
        finally:
            _end_process_group()
        for n in _notes:
            typer.echo(f"note: {n}", err=True)
        return result

    return wrapper


def _end_process_group() -> None:
    """Destroy a torchrun process group the command left up (`cdc ablate` keeps one across its
    points): left to the interpreter's exit, gloo can abort the process (exit -6 instead of 0 or 2)."""
    if "torch.distributed" in sys.modules:  # never import torch just to find there is nothing to end
        from cdc.train import distributed

        distributed.shutdown()


def _renamed(value: Any, old: Any, new_name: str, old_name: str) -> Any:
    """A renamed option's value: the old spelling (a hidden option) still works for one release."""
    if old is None:
        return value
    _notes.append(f"{old_name} is now {new_name}; the old spelling goes away in the next release")
    return old


ALLOW_PIPE_HELP = (
    "Let data.shards / --src be a pipe: command (it runs a program). Only your command line or "
    "CDC_ALLOW_PIPE=1 can allow it, never a recipe, manifest or checkpoint."
)


def allow_pipe(flag: bool) -> None:
    """--allow-pipe: the opt-in cdc.data.shards checks, as an environment variable so that loader
    worker processes (and every torchrun rank, each parsing its own flag) see it."""
    if flag:
        os.environ["CDC_ALLOW_PIPE"] = "1"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdc {__version__}")
        raise typer.Exit()


def _redact_stderr() -> None:
    """Tracebacks and Python warnings pass through cdc.redact too: a crash or a library's warning
    may quote a shard URL with a token, or a credential read from the environment."""
    import traceback
    import warnings

    from cdc.redact import redact

    def excepthook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(tp, value, tb))))

    show = warnings.showwarning
    if getattr(show, "redacts", False):  # installed by an earlier command in this process
        return

    def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        show(redact(str(message)), category, filename, lineno, file, line)

    showwarning.redacts = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
    warnings.showwarning = showwarning


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """CDC-FM toolkit."""
    _redact_stderr()


def run() -> None:  # pragma: no cover - console entry used by tests via CliRunner instead
    app(prog_name="cdc")
