"""`cdc tune`: get the most out of a finished run without training it again.

`cdc tune ema RUN` rebuilds any EMA length from the run's post-hoc EMA snapshots; `cdc tune
sampler RUN` searches the sampler settings against a reference. Each command parses options and
calls one library function under cdc/tune/.
"""

from __future__ import annotations

import typer

from cdc.cli.app import _Group, app

tune_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Tune a finished run: its EMA length (post-hoc EMA) and its sampler settings.",
)
app.add_typer(tune_app, name="tune")
