"""`cdc prepare`: images -> webdataset shards with every pyramid level."""

from __future__ import annotations

from pathlib import Path

import typer

from cdc.cli.app import _Command, app, friendly


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
