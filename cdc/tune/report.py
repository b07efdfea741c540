"""`cdc tune sampler`'s report: OUT/sampler.md (every trial, the held-out re-score, the command) and
OUT/sampler.png (each trial's two objective terms, and the objective along the descent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdc.fileio import atomic_write_bytes


def _row(i: int, r: dict[str, Any]) -> str:
    return (
        f"| {i} | {r['coord']} | {r['label']} | {r['fd']:.2f} | {r['accuracy']:.3f} | {r['swd_fine']:.4f} | "
        f"{r['blur_px']:.2f} | {r['fd_term']:.3f} | {r['detail_term']:.3f} | {r['objective']:.3f} | {r['seconds']:.0f} |"
    )


def markdown(res, guide: str) -> str:
    """The report as Markdown."""
    c = res.calibration
    n = c["n"]
    lines = [
        f"# cdc tune sampler ({len(res.trials)} trials of {n} images, {res.wall_s / 60:.1f} min this call)",
        "",
        f"Objective = (FD - {c['fd_real']:.2f}) / {c['fd_sd']:.2f} + (swd_fine - {c['swd_real']:.4f}) / "
        f"{c['swd_sd']:.4f}: each figure's excess over real held-out images in units of its sd between "
        f"{c['blocks']} disjoint real blocks of {n} (cdc/tune/objective.py). For scale, the first real block "
        f"blurred by 1 px reads FD {c['fd_blur1']:.2f}, swd_fine {c['swd_blur1']:.4f}.",
        "",
        "| # | coordinate | setting | FD | accuracy | swd_fine | blur px | FD term | detail term | objective | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[_row(i, r) for i, r in enumerate(res.trials)],
        "",
        f"Held out (images {n}..{n + res.heldout['base']['images'] - 1}, blocks of {n}: mean ± sd over blocks):",
        "",
        "| | setting | FD | accuracy | swd_fine | blur px | objective |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("run's own", res.base), ("tuned", res.best)):
        h = res.heldout["base" if s is res.base else "best"]

        def pm(k: str, fmt: str, h=h) -> str:
            sd = f" ± {h[k + '_sd']:{fmt}}" if k + "_sd" in h else ""
            return f"{h[k]:{fmt}}{sd}"

        lines.append(
            f"| {name} | {s.label()} | {pm('fd', '.2f')} | {pm('accuracy', '.3f')} | {pm('swd_fine', '.4f')} | "
            f"{pm('blur_px', '.2f')} | {pm('objective', '.3f')} |"
        )
    lines += ["", "```", res.command, "```", ""]
    return "\n".join(lines)


def plot(res, path: Path) -> None:
    """Left: each trial's FD term against its detail term (the winner ringed); right: the objective by trial."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    fd = [r["fd_term"] for r in res.trials]
    dt = [r["detail_term"] for r in res.trials]
    a.scatter(dt, fd, c=range(len(fd)), cmap="viridis")
    best = [r for r in res.trials if r["label"] == res.best.label()][0]
    a.scatter(
        [best["detail_term"]], [best["fd_term"]], s=200, facecolors="none", edgecolors="red", label="chosen"
    )
    a.set_xlabel("detail term (swd_fine excess / real sd)")
    a.set_ylabel("FD term (judge FD excess / real sd)")
    a.legend()
    b.plot([r["objective"] for r in res.trials], "o-")
    b.set_xticks(range(len(res.trials)), [r["coord"] for r in res.trials], rotation=70, fontsize=7)
    b.set_ylabel("objective (sum of both terms)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), "plot")


def write_report(out: Path, res, guide: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "sampler.md", markdown(res, guide).encode(), "report")
    plot(res, out / "sampler.png")
