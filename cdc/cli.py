"""The `cdc` command line: thin Typer commands, each parsing options and calling one library function.

No tensor code lives here, and the library never imports typer. Library errors that are the
user's to fix (ConfigError, ValueError from bad input, FileNotFoundError) become one-line
messages with exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from cdc import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="CDC-FM: coarse-to-fine pixel-space flow matching with one unified DiT.",
    pretty_exceptions_enable=False,
)


class UserError(Exception):
    """Raised by the library for bad input; the CLI prints it as one line."""


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-input errors from the library into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cdc.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, UserError, FileNotFoundError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """CDC-FM toolkit."""


# --- prepare ---

# --- train ---

# --- sample ---

# --- score ---

# --- ablate ---


def run() -> None:  # pragma: no cover - console entry used by tests via CliRunner instead
    app(prog_name="cdc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())

_ = Path  # keep the import for command modules that annotate paths
