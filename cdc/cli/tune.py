"""`cdc tune`: get the most out of a finished run without training it again.

`cdc tune ema RUN` rebuilds any EMA length from the run's post-hoc EMA snapshots; `cdc tune
sampler RUN` searches the sampler settings against a reference. Each command parses options and
calls one library function under cdc/tune/.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import _Command, _Group, app, friendly

tune_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Tune a finished run: its EMA length (post-hoc EMA) and its sampler settings.",
    epilog="""Examples:
cdc tune ema runs/quickstart --sigma-rel 0.03,0.05,0.08
cdc tune sampler runs/quickstart""",
)
app.add_typer(tune_app, name="tune")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"{what}: expected numbers separated by commas, e.g. 0.05,0.10, got {text!r}"
        ) from None


@tune_app.command(
    "ema",
    cls=_Command,
    epilog="""Examples:
cdc tune ema runs/quickstart --sigma-rel 0.05
cdc tune ema runs/quickstart --sigma-rel 0.03,0.05,0.08,0.12 --step 4000
cdc sample --ckpt runs/quickstart/checkpoints/ema-posthoc-0.050-step_0005200.pt -n 64

Needs a run trained with train.ema_snapshots > 0 (docs/posthoc-ema.md). Each length is written
as a new checkpoint, RUN/checkpoints/ema-posthoc-<sigma_rel>-step_<step>.pt; the run's own
checkpoints are never touched, and rerunning writes the same files again. The last line printed
is the last file written.""",
)
@friendly
def ema_cmd(
    run: Path = typer.Argument(..., help="Run dir whose ema-snapshots/ to combine."),
    sigma_rel: str = typer.Option(
        ..., "--sigma-rel", help="EMA length(s) as relative std, e.g. 0.05 or 0.03,0.05,0.10."
    ),
    step: int | None = typer.Option(
        None, "--step", help="Rebuild at this snapshot's step.", show_default="newest snapshot"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for the results.", show_default="RUN/checkpoints"
    ),
) -> None:
    """Rebuild any EMA length of a finished run from its post-hoc EMA snapshots (EDM2)."""
    from cdc.tune.ema import rebuild_ema

    written = rebuild_ema(run, _floats(sigma_rel, "--sigma-rel"), step=step, out_dir=out, say=typer.echo)
    for r in written:
        typer.echo(str(r.path))
