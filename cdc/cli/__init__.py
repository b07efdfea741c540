"""The `cdc` command line: one module per command group over `app` (cdc/cli/app.py), each command
parsing options and calling one library function; the library never imports typer. Importing the
command modules registers them, in the order `cdc --help` lists them."""

from cdc.cli import prepare, train, sample, edit, score, ablate, tune, tune_sampler  # noqa: F401, I001 (registers the commands, in this order)
from cdc.cli.app import app, run  # noqa: F401
