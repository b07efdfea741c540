"""`cdc train`: a recipe -> a run directory (single process or torchrun)."""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import ALLOW_PIPE_HELP, _Command, allow_pipe, app, friendly

# --- train ---


@app.command(
    cls=_Command,
    epilog="""Examples:
cdc train recipes/quickstart.yaml
cdc train recipes/quickstart.yaml --run-dir runs/tiny --set train.steps=300
cdc train recipes/k4.yaml --dry-run
torchrun --nproc_per_node 8 -m cdc train recipes/k4.yaml

Every setting not given by --set comes from the recipe, and what the recipe leaves out from
cdc/config.py's defaults (--dry-run prints the result).""",
)
@friendly
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/k4.yaml or recipes/quickstart.yaml."),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", help="Run directory; re-running into it resumes.", show_default="runs/<recipe name>"
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config value: section.key=value (repeatable).", show_default="none"
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config and parameter count, then exit."
    ),
    init: str = typer.Option(
        None,
        "--init",
        help="Start from these EMA weights (checkpoint file, run dir or `cdc export` folder), fresh optimizer: a fine-tune.",
        show_default="the recipe's train.init",
    ),
    allow_pipe_: bool = typer.Option(False, "--allow-pipe", help=ALLOW_PIPE_HELP),
) -> None:
    """Train CDC-FM (single process, or `torchrun --nproc_per_node N -m cdc train RECIPE`); re-run to resume."""
    import json

    from cdc import config
    from cdc.train import loop as T

    allow_pipe(allow_pipe_)
    cfg = config.load(recipe, [*set_, *([f"train.init={json.dumps(init)}"] if init else [])])
    if dry_run:
        info = T.describe(cfg)
        typer.echo(info["config"].rstrip())
        typer.echo(f"# parameters: {info['params']:,}")
        return
    from cdc.cli.rerun import continue_command, train_stop_line
    from cdc.fileio import check_out_path
    from cdc.interrupt import exit_code
    from cdc.tune.evaluate import TrainingEvaluation

    run_dir = run_dir or Path("runs") / recipe.stem
    check_out_path(run_dir, "--run-dir")
    try:
        out = T.train(cfg, run_dir, evaluation=TrainingEvaluation)
    except T.NonFiniteError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    except KeyboardInterrupt:  # outside the loop (start-up, the last save): checkpoints stay whole
        cmd = continue_command(ctx, run_dir=run_dir)
        typer.echo(f"interrupted; checkpoints in {run_dir} kept as they were; continue with: {cmd}", err=True)
        raise typer.Exit(130) from None
    line = train_stop_line(out, continue_command(ctx, run_dir=out["run_dir"]))
    if line and out["rank"] == 0:
        typer.echo(line, err=True)
    if out["signal"]:  # every rank agrees on it, so a torchrun job exits alike everywhere
        raise typer.Exit(exit_code(out["signal"]))
    typer.echo(f"run dir: {out['run_dir']} (step {out['step']})")
