"""`cdc score` (and `cdc score ref`): samples against a reference."""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import ALLOW_PIPE_HELP, _Command, _renamed, allow_pipe, app, friendly

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
    allow_pipe_: bool = typer.Option(False, "--allow-pipe", help=ALLOW_PIPE_HELP),
) -> None:
    """Score samples: FID, IS, precision/recall (ADM protocol) and Laplacian SWD; JSON next to SAMPLES.

    Score: `cdc score SAMPLES --ref REF.npz --metrics fid,is,pr,swd --stages`.

    Build a reference: `cdc score ref --src DIR --out REF.npz --side S --sides 32,64 -n N`
    (DIR: image folder or `cdc prepare` shards). To score a file literally named `ref`, write ./ref.
    """
    from cdc.eval import scoring as M
    from cdc.fileio import check_out_path

    allow_pipe(allow_pipe_)
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
