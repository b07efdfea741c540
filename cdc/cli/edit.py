"""`cdc upscale`, `cdc vary`, `cdc inpaint`: start the pyramid from a user's image."""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import _Command, app, friendly

SEEDS = "Variant j of input i uses the noise of image i of `cdc sample --seed SEED+j`, at any batch size."
NULL = "Without --class the model's null class (its unconditional branch) runs and CFG is off."
CK = "from checkpoint: sample."

# the options every editing command shares (Typer reads these as each command's defaults)
CKPT = typer.Option(None, "--ckpt", help="Run dir, checkpoint file or export folder.",
                    show_default="newest checkpoint under --runs-dir")  # fmt: skip
CLASS = typer.Option(None, "--class", help="Class to condition on.", show_default="null class, CFG off")
OUT = typer.Option(None, "--out", help="Output dir.", show_default="samples/<run>-step<step>-<command>")
N = typer.Option(1, "-n", "--num-images", help="Images (variants) per input image.")
STEPS = typer.Option(None, "--steps", help="Model evals per stage: 24 or 4,4,4.", show_default=CK + "steps")
CFG = typer.Option(
    None, "--cfg", help="CFG scale (needs --class), or one per stage.", show_default=CK + "cfg"
)
SOLVER = typer.Option(None, "--solver", help="euler | heun | sde.", show_default=CK + "solver")
SEED = typer.Option(
    None, "--seed", help="Run seed; variant j of input i: (seed + j, i).", show_default=CK + "seed"
)
BATCH = typer.Option(None, "--batch", help="Images per forward.", show_default=CK + "batch")
GUIDE = typer.Option(
    None, "--guide", help="Autoguidance: a checkpoint, step:N or none.", show_default=CK + "guide"
)
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a previous output in --out.")
DEVICE = typer.Option(None, "--device", help="cuda / cpu.", show_default="cuda if available, else cpu")
RUNS = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the newest run.")


def _report(s: dict) -> None:
    typer.echo(
        f"wrote {s['images']} images to {s['out']} ({s['sec_per_image']:.4f} s/image, steps {s['steps']}, "
        f"cfg {s['cfg']}, {s['solver']})"
    )


@app.command(
    "upscale",
    cls=_Command,
    epilog=f"""Examples:
cdc upscale photo.png --ckpt runs/quickstart
cdc upscale a.png b.jpg --ckpt runs/k4 --class 207 --cfg 2 -n 4 --out up/

Each image is cropped to its centre square and resized with Lanczos (as `cdc prepare` does) to
the largest stage input side that fits inside it (or --side), as printed per file; it enters the
stage that takes that side and the later stages, with the coupling noise sigma_k of training,
carry it to the final side. {NULL} {SEEDS} grid.png: input | bicubic | variants.""",
)
@friendly
def upscale_cmd(
    images: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Image files (PNG, JPEG, WebP, ...)."),
    side: int | None = typer.Option(None, "--side", help="Enter at this input side (px).", show_default="largest that fits"),
    ckpt: str | None = CKPT, klass: int | None = CLASS, out: Path | None = OUT, n: int = N,
    steps: str | None = STEPS, cfg: str | None = CFG, solver: str | None = SOLVER, seed: int | None = SEED,
    batch: int | None = BATCH, guide: str | None = GUIDE, overwrite: bool = OVERWRITE,
    device: str | None = DEVICE, runs_dir: Path = RUNS,
) -> None:  # fmt: skip
    """Upscale images: each enters the stage whose input side it matches; the later stages finish it."""
    from cdc.sample.edit_run import upscale

    _report(upscale(images, ckpt, klass, side, out=out, n=n, steps=steps, cfg=cfg, solver=solver, seed=seed,
                    batch=batch, guide=guide, overwrite=overwrite, device=device, runs_dir=runs_dir))  # fmt: skip


@app.command(
    "vary",
    cls=_Command,
    epilog=f"""Examples:
cdc vary shirt.png --stage 2 --ckpt runs/quickstart -n 8
cdc vary shirt.png --stage 3 --strength 0.5 --ckpt runs/quickstart -n 8

--stage k keeps the image's content at stage k's side (the image is cropped and resized to it as
`cdc prepare` does) and resamples every finer stage. --strength s (0 < s < 1) also redraws stage
k's own detail, SDEdit-style: stage k re-runs from tau = 1 - s on the path from its source
U(D(x)) + sigma_k zeta to the image, its box average at the coarser side held by replacement after
every step (ILVR), so the output's low-pass equals the input's. {NULL} {SEEDS}""",
)
@friendly
def vary_cmd(
    image: Path = typer.Argument(..., metavar="IMAGE", help="Image file."),
    stage: int = typer.Option(..., "--stage", help="Keep the content at this stage's side (1 = coarsest)."),
    strength: float = typer.Option(0.0, "--strength", help="Also redraw stage k's detail from tau = 1 - s (0 <= s < 1)."),
    ckpt: str | None = CKPT, klass: int | None = CLASS, out: Path | None = OUT, n: int = N,
    steps: str | None = STEPS, cfg: str | None = CFG, solver: str | None = SOLVER, seed: int | None = SEED,
    batch: int | None = BATCH, guide: str | None = GUIDE, overwrite: bool = OVERWRITE,
    device: str | None = DEVICE, runs_dir: Path = RUNS,
) -> None:  # fmt: skip
    """Variations of an image: its content at one stage's side kept, everything finer resampled."""
    from cdc.sample.edit_run import vary

    _report(vary(image, stage, strength, ckpt, klass, out=out, n=n, steps=steps, cfg=cfg, solver=solver, seed=seed,
                 batch=batch, guide=guide, overwrite=overwrite, device=device, runs_dir=runs_dir))  # fmt: skip


@app.command(
    "inpaint",
    cls=_Command,
    epilog=f"""Examples:
cdc inpaint shirt.png --mask hole.png --ckpt runs/quickstart -n 8
cdc inpaint shirt.png --mask hole.png --stage 2 --class 0 --ckpt runs/quickstart

Method: replacement. The image (and the mask, same size; white = generate) are cropped and resized
to the final side as `cdc prepare` does; from --stage k on, after every solver step the pixels
outside the mask are set to the known image's own path alpha(tau) x0 + beta(tau) x1 at that stage
(x0 its source, sharing the stage's noise), so the model generates the masked region around them
and the output equals the input outside the mask. Stages before k are the image's own box
averages (the masked region's coarse content kept). {NULL} {SEEDS}""",
)
@friendly
def inpaint_cmd(
    image: Path = typer.Argument(..., metavar="IMAGE", help="Image file."),
    mask: Path = typer.Option(..., "--mask", help="Mask of the image's size: white = generate, black = keep."),
    stage: int = typer.Option(1, "--stage", help="Generate the masked region from this stage on (1 = from noise)."),
    ckpt: str | None = CKPT, klass: int | None = CLASS, out: Path | None = OUT, n: int = N,
    steps: str | None = STEPS, cfg: str | None = CFG, solver: str | None = SOLVER, seed: int | None = SEED,
    batch: int | None = BATCH, guide: str | None = GUIDE, overwrite: bool = OVERWRITE,
    device: str | None = DEVICE, runs_dir: Path = RUNS,
) -> None:  # fmt: skip
    """Inpaint: generate the masked region, holding the rest to the image at every step."""
    from cdc.sample.edit_run import inpaint

    _report(inpaint(image, mask, stage, ckpt, klass, out=out, n=n, steps=steps, cfg=cfg, solver=solver, seed=seed,
                    batch=batch, guide=guide, overwrite=overwrite, device=device, runs_dir=runs_dir))  # fmt: skip
