"""`cdc ablate`: one of the paper's sweeps, trained, sampled, scored and reported."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cdc.cli.app import ALLOW_PIPE_HELP, _Command, _renamed, allow_pipe, app, friendly
from cdc.redact import redact_args

# --- ablate ---


@app.command(
    cls=_Command,
    epilog="""Examples:
cdc ablate --list
cdc ablate gamma
cdc ablate gamma --values 1,2,3 -n 500 --out runs/ablate/gamma
cdc ablate cfg --values 1,2,3 --steps 4,4,8
torchrun --nproc_per_node 8 -m cdc ablate gamma --recipe recipes/k4.yaml --train-steps 100000 -n 10000

Defaults "the recipe's" come from --recipe (the CPU Fashion-MNIST base by default).""",
)
@friendly
def ablate(
    name: str | None = typer.Argument(
        None,
        help="gamma, sigma, gamma-sigma, stages, interpolant, fusion, "
        "unified, loss-weight, tau-dist, pos, cfg, steps (see --list).",
    ),
    list_: bool = typer.Option(
        False, "--list", help="List the sweeps, their keys, default values and paper figure."
    ),
    recipe: Path | None = typer.Option(
        None, "--recipe", help="Base recipe.", show_default="cdc/assets/ablate-base.yaml, CPU Fashion-MNIST"
    ),
    values: str | None = typer.Option(
        None, "--values", help="Comma list, e.g. 1,2,3 (gamma-sigma: 1,2x0.5,1).", show_default="the sweep's, see --list"
    ),
    out: Path | None = typer.Option(None, "--out", help="Sweep folder.", show_default="runs/ablate/NAME"),
    train_steps: int | None = typer.Option(
        None, "--train-steps", help="Optimizer steps per point.", show_default="the recipe's train.steps"
    ),
    minutes: float | None = typer.Option(
        None, "--minutes", help="Wall-clock training cap per point.", show_default="the recipe's train.max_minutes"
    ),
    samples: int = typer.Option(500, "-n", "--num-images", help="Images sampled and scored per point."),
    samples_old: int | None = typer.Option(
        None, "--samples", hidden=True, help="Old spelling of -n/--num-images."
    ),
    steps: str | None = typer.Option(
        None, "--steps", help="Sampling steps per stage: 8 or 4,4,8.", show_default="the recipe's sample.steps"
    ),
    cfg: str | None = typer.Option(
        None,
        "--cfg",
        help="CFG scale for sampling, or one per stage: 2,3,3.",
        show_default="the recipe's sample.cfg",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override the base recipe: section.key=value (repeatable).", show_default="none"
    ),
    allow_pipe_: bool = typer.Option(False, "--allow-pipe", help=ALLOW_PIPE_HELP),
) -> None:
    """Run one of the paper's ablations: train, sample and score each value; re-run to resume."""
    allow_pipe(allow_pipe_)
    from cdc.ablate import runner as A
    from cdc.ablate import sweeps

    if list_:
        for s in sweeps.list_sweeps():
            typer.echo(f"{s['name']:<12} {', '.join(s['keys']):<28} [{s['values']}]  {s['paper']}")
        typer.echo(f"default base recipe: {sweeps.DEFAULT_RECIPE}")
        return
    if name is None:
        raise ValueError("give an ablation NAME (e.g. `cdc ablate gamma`) or --list")
    samples = _renamed(samples, samples_old, "-n/--num-images", "--samples")
    p = A.plan(name, recipe, values, out, train_steps, minutes, samples, steps, cfg, set_)
    p.argv = redact_args(["cdc", "ablate", *sys.argv[2:]]) if len(sys.argv) > 1 else []  # recorded and shown
    try:
        rows = A.run_sweep(p)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        raise typer.Exit(130) from None
    if rows:
        typer.echo(f"{len(rows)} points; wrote {p.out}/results.csv, results.md, results.png")
