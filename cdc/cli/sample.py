"""`cdc sample` and `cdc export`: a checkpoint -> images, or -> a folder to share."""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import _Command, _renamed, app, friendly

# --- sample ---


def _from_ckpt(key: str) -> str:
    """The default shown for a sampler setting the checkpoint stores (its recipe's `sample:` section)."""
    return f"from checkpoint: sample.{key}"


@app.command(
    "sample",
    cls=_Command,
    epilog="""Examples:
cdc sample --ckpt runs/quickstart -n 64
cdc sample --ckpt runs/k4 -n 50000 --cfg 2,3,3 --steps 24 --out samples/k4
cdc sample --ckpt runs/quickstart --guide none --stages
torchrun --nproc_per_node 8 -m cdc sample --ckpt runs/k4 -n 50000 --out samples/k4

Defaults "from checkpoint" are the sampler settings stored with the checkpoint (its recipe's
sample: section). Sampling the same checkpoint again writes samples/<run>-step<step>-2, -3, ...;
an interrupted job continues with --resume.""",
)
@friendly
def sample_cmd(
    ctx: typer.Context,
    ckpt: str | None = typer.Option(
        None, "--ckpt", help="Run dir or checkpoint file.", show_default="newest checkpoint under --runs-dir"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output dir.", show_default="samples/<run>-step<step>, then -2, -3, ... if done"
    ),
    n: int = typer.Option(64, "-n", "--num-images", help="Number of images."),
    n_old: int | None = typer.Option(None, "--n", hidden=True, help="Old spelling of -n/--num-images."),
    classes: str = typer.Option("all", "--classes", help="'all' (image i: class i % C) or e.g. 3,5,7."),
    steps: str | None = typer.Option(
        None, "--steps", help="Model evals per stage: 24 or 4,4,4,4.", show_default=_from_ckpt("steps")
    ),
    cfg: str | None = typer.Option(
        None,
        "--cfg",
        help="CFG scale (1: conditional, 0: unconditional), or one per stage: 2,3,3.",
        show_default=_from_ckpt("cfg"),
    ),
    solver: str | None = typer.Option(
        None, "--solver", help="euler | heun | sde.", show_default=_from_ckpt("solver")
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Run seed; image i uses noise seeded by (seed, i).", show_default=_from_ckpt("seed")
    ),
    batch: int | None = typer.Option(
        None, "--batch", help="Images per forward per GPU.", show_default=_from_ckpt("batch")
    ),
    stages: bool = typer.Option(
        False, "--stages/--no-stages", help="Also save every stage's output and Fig. 9 panels."
    ),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights or the raw ones."),
    interval: str | None = typer.Option(
        None, "--interval", help="CFG only for tau in [LO,HI), e.g. 0.1,1.0", show_default=_from_ckpt("interval")
    ),
    sde_eps: float | None = typer.Option(
        None, "--sde-eps", help="Diffusion scale of --solver sde.", show_default=_from_ckpt("sde_eps")
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs in a non-empty --out."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted job in --out."),
    device: str | None = typer.Option(
        None, "--device", help="cuda / cpu.", show_default="cuda if available, else cpu"
    ),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the newest run."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast on CUDA (CPU always runs fp32)."),
    guide: str | None = typer.Option(
        None,
        "--guide",
        help="Autoguidance by a weaker checkpoint: a file, a run dir, step:N of this run, or none.",
        show_default=_from_ckpt("guide"),
    ),
    guide_scale: str | None = typer.Option(
        None,
        "--guide-scale",
        help="Autoguidance weight (1 = off), or one per stage: 2,2,2.",
        show_default=_from_ckpt("guide_scale"),
    ),
    cuda_graph_side: int | None = typer.Option(
        None,
        "--cuda-graph-side",
        help="CUDA: replay stages of side <= this (px) from CUDA graphs; 0 = off.",
        show_default=_from_ckpt("cuda_graph_side"),
    ),
    preview: bool = typer.Option(
        False,
        "--preview",
        help="Write preview/stage<k>.png: the current batch at each stage, once it exists.",
    ),
) -> None:
    """Sample images: PNGs, samples.npz (ADM format), grid.png, samples.json; works under torchrun."""
    from cdc.cli.rerun import continue_command
    from cdc.interrupt import Interrupted, exit_code, signal_name
    from cdc.sample.generate import generate

    n = _renamed(n, n_old, "-n/--num-images", "--n")
    try:
        s = generate(
            ckpt, out, n, classes, steps, cfg, solver, seed, batch, stages, ema, interval, sde_eps,
            overwrite, resume, device, runs_dir, progress=True, bf16=bf16, guide=guide, guide_scale=guide_scale,
            cuda_graph_side=cuda_graph_side, preview=preview,
        )  # fmt: skip
    except Interrupted as e:  # finished images are kept; --resume (same options, same --out) makes the rest
        if e.info.get("main"):
            pin = {"ckpt": e.info["ckpt"], "out": e.info["out"], "resume": True, "overwrite": None} if "out" in e.info else {}
            cmd = continue_command(ctx, **pin)  # no image yet: the same command again
            typer.echo(f"stopped by signal {signal_name(e.signum)}; {e.saved}; continue with: {cmd}", err=True)
        raise typer.Exit(exit_code(e.signum)) from None
    if not s:  # not rank 0
        return
    per_stage = " / ".join(f"{v:.4f}" for v in s["sec_per_image_stage"] or [])
    typer.echo(f"wrote {s['n']} images to {s['out']} ({s['generated']} new, {s['resumed']} kept)")
    typer.echo(f"checkpoint: {s['ckpt']} (step {s['step']}, {s['weights']} weights)")
    if s["sec_per_image"] is not None:
        typer.echo(
            f"NFE {s['nfe']}/image, {s['sec_per_image']:.4f} s/image (stages {per_stage}), "
            f"steps {s['steps']}, cfg {s['cfg']}, {s['solver']}"
            + (f", guide {s['guide_scale']} x {Path(s['guide']).name}" if s.get("guide") else "")
        )


# --- export ---
@app.command(
    "export",
    cls=_Command,
    epilog="""Examples:
cdc export runs/quickstart --out exports/quickstart
cdc export runs/k4/checkpoints/step_0400000.pt --out exports/k4 --dtype bf16
cdc sample --ckpt exports/quickstart -n 16

The folder holds model.safetensors (EMA weights), config.json (the resolved config and sampler
defaults), SHA256SUMS (checked on load), README.md (a model card) and guide/ (the run's autoguide,
when it has one); cdc sample, cdc.load, the judge and cdc train --init read it like a run.""",
)
@friendly
def export_cmd(
    src: str = typer.Argument(..., metavar="RUN_OR_CKPT", help="Run dir or checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Folder to write (made; replaced only with --overwrite)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (samples equal the run's) or bf16 (half the size)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous export in --out."),
) -> None:
    """Export a run's EMA weights to share: model.safetensors, config.json, SHA256SUMS, README.md (+ guide/)."""
    from cdc.train.export import export

    meta = export(src, out, dtype, overwrite)
    typer.echo(f"wrote {out} (step {meta['step']}, {meta['export']['weights']} weights, {dtype})")
