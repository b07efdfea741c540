"""`cdc tune sampler RUN`: search a finished run's sampler settings (cdc.tune.sampler)."""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import _Command, friendly
from cdc.cli.tune import tune_app


@tune_app.command(
    "sampler",
    cls=_Command,
    epilog="""Examples:
cdc tune sampler runs/quickstart
cdc tune sampler runs/quickstart --n 200 --max-trials 5   # stop after 5 new trials; rerun continues
cdc tune sampler runs/quickstart --coords solver,cfg_rest --no-write-defaults

Every trial samples images 0..N-1 and scores them with the Fashion-MNIST judge's FD and the
finest-band SWD, each in units of its sd between blocks of real images (docs/tune.md). The winner and the
run's own settings are re-scored on images N..3N-1. Results: RUN/tune/sampler.jsonl (one line per
trial; a rerun skips finished ones), sampler.md, sampler.png. The chosen settings go to
RUN/sample.yaml, which `cdc sample --ckpt RUN` then uses as the run's defaults (delete it to go
back to the checkpoint's); checkpoints are never written. The last line is the `cdc sample`
command with the chosen settings spelled out.""",
)
@friendly
def tune_sampler_cmd(
    run: Path = typer.Argument(..., help="Run directory (the --run-dir it trained in)."),
    n: int = typer.Option(300, "--n", help="Images per trial (and per held-out block)."),
    out: Path | None = typer.Option(None, "--out", help="Results folder.", show_default="RUN/tune"),
    coords: str = typer.Option(
        "solver,guide_rest,cfg_rest,cfg_first,guide_first,interval,steps,ema",
        "--coords",
        help="Coordinates to search, in this order (ema: only with post-hoc EMA snapshots).",
    ),
    passes: int = typer.Option(1, "--passes", help="Coordinate-descent passes."),
    max_trials: int | None = typer.Option(
        None,
        "--max-trials",
        help="Stop after this many new trials (rerun to continue).",
        show_default="no limit",
    ),
    heldout_blocks: int = typer.Option(2, "--heldout-blocks", help="Held-out blocks of N images."),
    clf: Path = typer.Option(
        Path("runs/fmnist-classifier.pt"), "--clf", help="Fashion-MNIST judge (trained once if absent)."
    ),
    write_defaults: bool = typer.Option(
        True, "--write-defaults/--no-write-defaults", help="Write the chosen settings to RUN/sample.yaml, the run's sampler defaults from then on."
    ),
    device: str | None = typer.Option(None, "--device", help="cuda / cpu.", show_default="cuda if available"),
    batch: int | None = typer.Option(
        None, "--batch", help="Images per forward.", show_default="the run's sample.batch"
    ),
) -> None:
    """Search CFG, autoguidance, guidance interval, solver, step split and EMA length against a detail-aware objective."""
    from cdc.tune.objective import fmnist_objective
    from cdc.tune.sampler import run_dir_of, tune_sampler

    run_dir_of(run)  # a wrong path is one line before the judge loads (or trains, once)
    res = tune_sampler(
        run, fmnist_objective(clf), n=n, out=out, passes=passes, max_trials=max_trials, device=device, batch=batch,
        heldout_blocks=heldout_blocks, coords=tuple(c.strip() for c in coords.split(",") if c.strip()),
        write_defaults=write_defaults,
    )  # fmt: skip
    if not res.finished:
        typer.echo(
            f"stopped after {res.new_trials} new trials (--max-trials); run the same command again to continue"
        )
        return
    h = res.heldout
    typer.echo(
        f"held out ({h['best']['images']} images): FD {h['base']['fd']:.2f} -> {h['best']['fd']:.2f}, "
        f"swd_fine {h['base']['swd_fine']:.4f} -> {h['best']['swd_fine']:.4f}, "
        f"objective {h['base']['objective']:.3f} -> {h['best']['objective']:.3f} ({res.wall_s / 60:.1f} min)"
    )
    typer.echo(res.command)
