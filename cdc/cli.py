"""The `cdc` command line: thin Typer commands, each parsing options and calling one library function.

No tensor code lives here, and the library never imports typer. Library errors that are the
user's to fix (ConfigError, ValueError from bad input, and OSError such as FileNotFoundError)
become one-line messages with exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
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
        for n in _notes:
            typer.echo(f"note: {n}", err=True)
        return result

    return wrapper


def _renamed(value: Any, old: Any, new_name: str, old_name: str) -> Any:
    """A renamed option's value: the old spelling (a hidden option) still works for one release."""
    if old is None:
        return value
    _notes.append(f"{old_name} is now {new_name}; the old spelling goes away in the next release")
    return old


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """CDC-FM toolkit."""


# --- prepare ---
@app.command(
    cls=_Command,
    epilog="""Examples:
cdc prepare --src fashion-mnist
cdc prepare --src /data/ILSVRC2012 --workers 16
cdc prepare --src /data/ILSVRC2012 --split val --out data/ILSVRC2012-val-256
cdc prepare --src photos/ --limit 1000 --overwrite

Defaults marked "idx:" apply to idx sources (fashion-mnist, MNIST-style folders).""",
)
@friendly
def prepare(
    src: str = typer.Option(..., "--src", help="ILSVRC2012 root, class folders, idx folder, fashion-mnist"),
    out: Path = typer.Option(
        None, "--out", help="Output folder.", show_default="data/<source>-<side>"
    ),
    side: int = typer.Option(None, "--side", help="Final training side.", show_default="256; idx: 32"),
    expand: float = typer.Option(
        None, "--expand", help="Stored top level = side * expand.", show_default="1.125; idx: 1"
    ),
    levels: int = typer.Option(
        None, "--levels", help="Pyramid levels stored per sample.", show_default="4; idx: 3"
    ),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    workers: int = typer.Option(1, "--workers", help="Parallel processes."),
    limit: int = typer.Option(
        None, "--limit", help="Keep N files evenly spaced over the sorted list.", show_default="all files"
    ),
    split: str = typer.Option("train", "--split", help="train | val | test (ILSVRC val/, idx t10k)."),
    png: str = typer.Option(
        "store",
        "--png",
        help="store (default, fastest: ~185 img/s/core) | huffman (~20% smaller shards, ~120 img/s/core).",
    ),
    crop: str = typer.Option(
        None,
        "--crop",
        help="full (Table 7): whole image at its aspect ratio | center: centre square.",
        show_default="full; idx: center",
    ),
    store: str = typer.Option(
        "auto",
        "--store",
        help="auto (jpeg-top for image trees, png for idx) | png | webp (lossless) | jpeg (JPEG top, "
        "exact lossless lower levels) | jpeg-top (JPEG top only, smallest); see docs/performance.md.",
    ),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality", help="JPEG quality of the top level (jpeg stores)."),
    order: str = typer.Option(
        "shuffled",
        "--order",
        help="shuffled: items in a seeded random order, so every shard mixes classes | sorted: class by class.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffled order (recorded in the manifest)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="First delete --out's shards, manifest and resume state (other files stay)."
    ),
) -> None:
    """Decode images once into webdataset shards holding every pyramid level (resumable: re-run the same command)."""
    from cdc.data.prepare import prepare as run_prepare
    from cdc.fileio import check_out_path

    if out is not None:
        check_out_path(out, "--out")
    try:
        m = run_prepare(
            src, out, side, expand, levels, shard_size, workers, limit, split,
            png=png, crop=crop, store=store, jpeg_quality=jpeg_quality, order=order, seed=seed,
            overwrite=overwrite,
        )
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        raise typer.Exit(130) from None
    n_skip = len(m["skipped"])
    typer.echo(f"{m['count']} samples in {len(m['shards'])} shards, levels {m['levels']}, {n_skip} skipped")


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
        help="Start from this checkpoint's EMA weights (file or run dir), fresh optimizer: a fine-tune.",
        show_default="the recipe's train.init",
    ),
) -> None:
    """Train CDC-FM (single process, or `torchrun --nproc_per_node N -m cdc train RECIPE`); re-run to resume."""
    import json

    from cdc import config
    from cdc.train import loop as T

    cfg = config.load(recipe, [*set_, *([f"train.init={json.dumps(init)}"] if init else [])])
    if dry_run:
        info = T.describe(cfg)
        typer.echo(info["config"].rstrip())
        typer.echo(f"# parameters: {info['params']:,}")
        return
    from cdc.fileio import check_out_path
    from cdc.interrupt import exit_code
    from cdc.rerun import continue_command, train_stop_line

    run_dir = run_dir or Path("runs") / recipe.stem
    check_out_path(run_dir, "--run-dir")
    try:
        out = T.train(cfg, run_dir)
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
) -> None:
    """Sample images: PNGs, samples.npz (ADM format), grid.png, samples.json; works under torchrun."""
    from cdc.interrupt import Interrupted, exit_code, signal_name
    from cdc.rerun import continue_command
    from cdc.sample.generate import generate

    n = _renamed(n, n_old, "-n/--num-images", "--n")
    try:
        s = generate(
            ckpt, out, n, classes, steps, cfg, solver, seed, batch, stages, ema, interval, sde_eps,
            overwrite, resume, device, runs_dir, progress=True, bf16=bf16, guide=guide, guide_scale=guide_scale,
            cuda_graph_side=cuda_graph_side,
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
defaults) and README.md (a model card); cdc sample, cdc.load and the judge read it like a run.""",
)
@friendly
def export_cmd(
    src: str = typer.Argument(..., metavar="RUN_OR_CKPT", help="Run dir or checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Folder to write (made; replaced only with --overwrite)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 (samples equal the run's) or bf16 (half the size)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous export in --out."),
) -> None:
    """Export a run's EMA weights to share: model.safetensors, config.json, README.md."""
    from cdc.train.export import export

    meta = export(src, out, dtype, overwrite)
    typer.echo(f"wrote {out} (step {meta['step']}, {meta['export']['weights']} weights, {dtype})")


# --- score ---


def _int_list(s: str | None) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()] if s else []
    except ValueError:
        raise ValueError(f"--sides must be comma-separated integers, got {s!r}") from None


@app.command(
    "score",
    cls=_Command,
    epilog="""Examples:
cdc score ref --src data/fashion-mnist-32 --out ref.npz --metrics swd
cdc score samples/quickstart-step2000/samples.npz --ref ref.npz
cdc score ref --src VIRTUAL_imagenet256_labeled.npz --out ref256.npz --sides 32,64,128
cdc score samples/k4/samples.npz --ref ref256.npz --stages

Options marked "ref:" apply to `cdc score ref`. SWD needs no Inception weights; FID, IS and PR do.""",
)
@friendly
def score_cmd(
    samples: str = typer.Argument(
        ...,
        metavar="SAMPLES|ref",
        help="samples.npz (ADM: arr_0 uint8 NHWC) or PNG folder; `ref`: build a reference",
    ),
    ref: Path | None = typer.Option(
        None,
        "--ref",
        help="Reference .npz from `cdc score ref`, or an ADM batch (VIRTUAL_imagenet256_labeled.npz).",
        show_default="none; required to score",
    ),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        help="Comma list of fid,is,pr,swd (default: score: what REF holds; ref: fid,pr,swd, swd needs no weights).",
    ),
    inception: Path | None = typer.Option(
        None,
        "--inception",
        help="pt_inception-2015-12-05-6726825d.pth.",
        show_default="torch hub checkpoints dir",
    ),
    batch: int = typer.Option(100, "--batch", min=1, help="Images per Inception batch."),
    stages: bool = typer.Option(
        False, "--stages/--no-stages", help="Also per-stage FID of stages.npz next to SAMPLES."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cuda / cpu.", show_default="cuda if available, else cpu"
    ),
    data: str | None = typer.Option(
        None,
        "--src",
        help="ref: image folder, prepared shards folder, or .npz (arr_0, e.g. ADM's).",
        show_default="none; required by ref",
    ),
    data_old: str | None = typer.Option(None, "--data", hidden=True, help="Old spelling of --src."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="ref: reference .npz to write; score: JSON path.",
        show_default="ref: required; score: SAMPLES.scores.json",
    ),
    side: int | None = typer.Option(None, "--side", help="ref: image side.", show_default="that of the data"),
    sides: str | None = typer.Option(
        None, "--sides", help="ref: stage sides for per-stage FID: 32,64", show_default="none"
    ),
    n: int | None = typer.Option(
        None, "-n", "--num-images", help="ref: use the first N images.", show_default="all"
    ),
    n_old: int | None = typer.Option(None, "--n", hidden=True, help="Old spelling of -n/--num-images."),
) -> None:
    """Score samples: FID, IS, precision/recall (ADM protocol) and Laplacian SWD; JSON next to SAMPLES.

    Score: `cdc score SAMPLES --ref REF.npz --metrics fid,is,pr,swd --stages`.

    Build a reference: `cdc score ref --src DIR --out REF.npz --side S --sides 32,64 -n N`
    (DIR: image folder or `cdc prepare` shards). To score a file literally named `ref`, write ./ref.
    """
    from cdc.eval import scoring as M
    from cdc.fileio import check_out_path

    data = _renamed(data, data_old, "--src", "--data")
    n = _renamed(n, n_old, "-n/--num-images", "--n")
    if out is not None:
        check_out_path(out, "--out", kind="file")
    ms = metrics
    if samples == "ref":
        if data is None or out is None:
            raise ValueError("`cdc score ref` needs --src DIR and --out REF.npz")
        ms = ",".join(m for m in (metrics or "fid,pr,swd").split(",") if m.strip() != "is") or "swd"
        desc = M.build_reference(
            data, out, side, n, _int_list(sides), ms, inception_path=inception, batch=batch, device=device
        )
        typer.echo(f"wrote {out}: {desc['count']} images at {desc['side']}px, {','.join(desc['metrics'])}")
        return
    if ref is None:
        raise ValueError("--ref REF.npz is required (build it with `cdc score ref --src DIR --out REF.npz`)")
    res = M.score(samples, ref, ms, inception, batch, device, stages=stages, out=out)
    for line in res["notices"]:
        typer.echo(f"notice: {line}", err=True)
    typer.echo(f"reference: {res['reference']['used']}")
    for k, v in res["metrics"].items():
        if k == "fid_stages":
            v = ", ".join(f"{s['side']}px {s['fid']:.3f}" for s in v.values())
        elif k == "swd":
            v = f"{v['mean']:.4f} (levels {', '.join(f'{x:.4f}' for x in v['levels'])})"
        typer.echo(f"{k}: {v}")
    typer.echo(f"wrote {res['written']}")


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
) -> None:
    """Run one of the paper's ablations: train, sample and score each value; re-run to resume."""
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
    p.argv = ["cdc", "ablate", *sys.argv[2:]] if len(sys.argv) > 1 else []
    try:
        rows = A.run_sweep(p)
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        raise typer.Exit(130) from None
    if rows:
        typer.echo(f"{len(rows)} points; wrote {p.out}/results.csv, results.md, results.png")


def run() -> None:  # pragma: no cover - console entry used by tests via CliRunner instead
    app(prog_name="cdc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
