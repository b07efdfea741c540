"""Tables and plots of a `cdc ablate` sweep: results.csv, results.md and results.png.

The rows are the per-point `result.json` dicts unchanged: the CSV holds their exact values
(Python's shortest round-trip float repr), the Markdown table the same values rounded by `fmt`,
and the plot draws them (`plot` returns the series it drew, so tests can compare).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from cdc.fileio import atomic_write_bytes

# metric key -> (column title, scale for display, plotted)
METRICS: dict[str, tuple[str, float, bool]] = {
    "fid": ("FID ↓", 1.0, True),
    "is": ("IS ↑", 1.0, True),
    "precision": ("precision ↑", 1.0, True),
    "recall": ("recall ↑", 1.0, True),
    "judge_accuracy": ("judge acc ↑", 1.0, True),
    "judge_fd": ("judge FD ↓", 1.0, True),
    "swd": ("SWD x1e3 ↓", 1e3, True),
    "sample_sec_per_image": ("ms / image", 1e3, True),
    "nfe": ("NFE", 1.0, False),
    "loss": ("final loss", 1.0, False),
    "train_images_per_s": ("train img/s", 1.0, False),
    "train_steps": ("train steps", 1.0, False),
    "global_batch": ("global batch", 1.0, False),  # batch_size x grad_accum x processes, as trained
    "processes": ("processes", 1.0, False),
    "train_seconds": ("train s", 1.0, False),  # loop time summed over every stretch of a resumed run
    "params": ("params", 1.0, False),
}
FIXED = ("point",)


def fmt(key: str, v: Any) -> str:
    """Display form of one value in results.md (scaled per METRICS, 4 significant digits)."""
    if v is None or v == "":
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if key == "params":
        return f"{v / 1e6:.3g}M"
    x = v * METRICS.get(key, ("", 1.0, False))[1]
    return str(int(x)) if isinstance(v, int) else f"{x:.4g}"


def columns(rows: list[dict[str, Any]], swept: tuple[str, ...] | list[str]) -> list[str]:
    """point, the swept value column(s), metrics in METRICS order, then anything else."""
    seen = [k for r in rows for k in r]
    value_cols = [k for k in dict.fromkeys(seen) if k not in METRICS and k not in FIXED and k != "samples"]
    value_cols.sort(key=lambda k: (k not in swept, 0))
    metric_cols = [k for k in METRICS if k in seen]
    return [*FIXED, *value_cols, *metric_cols, *(["samples"] if "samples" in seen else [])]


def to_csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]], cols: list[str], title: str, notes: list[str]) -> str:
    head = [METRICS[c][0] if c in METRICS else c for c in cols]
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _numeric(vals: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def plot(path: Path, rows: list[dict[str, Any]], xkeys: list[str], title: str) -> dict[str, Any]:
    """Each plotted metric vs the swept value (one panel each), or heat maps for a 2-key grid.

    Returns {metric: (x values, y values)} (grid: {metric: (xs, ys, matrix)}) as drawn, unscaled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mets = [k for k, (_, _, on) in METRICS.items() if on and any(r.get(k) is not None for r in rows)]
    ncol = min(len(mets), 3) or 1
    nrow = max(math.ceil(len(mets) / ncol), 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    drawn: dict[str, Any] = {}
    grid = len(xkeys) == 2
    if grid:
        gx = sorted({r[xkeys[0]] for r in rows})
        gy = sorted({r[xkeys[1]] for r in rows})
    for ax, m in zip(axes.flat, mets):
        label, scale, _ = METRICS[m]
        if grid:
            mat = [[None] * len(gx) for _ in gy]
            for r in rows:
                mat[gy.index(r[xkeys[1]])][gx.index(r[xkeys[0]])] = r.get(m)
            shown = [[math.nan if v is None else v * scale for v in row] for row in mat]
            im = ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(gx)), [f"{v:g}" for v in gx])
            ax.set_yticks(range(len(gy)), [f"{v:g}" for v in gy])
            ax.set_xlabel(xkeys[0].split(".")[-1])
            ax.set_ylabel(xkeys[1].split(".")[-1])
            for i, row in enumerate(shown):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=7)
            fig.colorbar(im, ax=ax)
            drawn[m] = (gx, gy, mat)
        else:
            pts = [(r[xkeys[0]], r[m]) for r in rows if r.get(m) is not None]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if _numeric(xs):
                ax.plot(xs, [y * scale for y in ys], "o-")
            else:
                ax.bar(range(len(xs)), [y * scale for y in ys], color="tab:blue")
                ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=15)
            ax.set_xlabel(xkeys[0].split(".")[-1])
            ax.grid(alpha=0.3)
            drawn[m] = (xs, ys)
        ax.set_title(label, fontsize=10)
    for ax in list(axes.flat)[len(mets) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return drawn


def batch_text(rows: list[dict[str, Any]], batch_size: int) -> str:
    """The batch the points trained with, as logged: global when known (older rows: per process)."""
    seen = {(r["global_batch"], r.get("processes")) for r in rows if r.get("global_batch") is not None}
    if not seen:
        return f"batch {batch_size} per process"
    if len(seen) > 1:
        return "the global batch in the table"
    g, n = seen.pop()
    if not (isinstance(g, int) and isinstance(n, int)):  # changed along a resumed run, e.g. "8→16"
        return f"global batch {g}"
    procs = f"{n} process" + ("es" if n != 1 else "")
    return f"global batch {g} ({batch_size} per process × grad_accum {g // (batch_size * n)} × {procs})"


def write(out: Path, sweep: Any, rows: list[dict[str, Any]], plan: Any) -> dict[str, Any]:
    """results.csv, results.md and results.png in `out`; returns what the plot drew."""
    xkeys = (
        list(sweep.keys)
        if sweep.name == "gamma-sigma"
        else [sweep.name if sweep.name in ("unified", "pos") else sweep.keys[0]]
    )
    cols = columns(rows, xkeys)
    atomic_write_bytes(out / "results.csv", to_csv(rows, cols).encode())
    b = plan.base
    budget = f"{b.train.steps} optimizer steps of {batch_text(rows, b.train.batch_size)}" + (
        f" (capped at {b.train.max_minutes:g} min)" if b.train.max_minutes else ""
    )
    notes = [
        f"Sweep `{sweep.name}` ({sweep.paper}); base recipe `{plan.recipe}`, "
        + (
            f"each point trained for {budget}"
            if sweep.train
            else f"one run trained for {budget}, sampled per value"
        )
        + f"; {plan.n_samples} samples per point, {b.sample.solver}, "
        f"{b.sample.steps} steps per stage, CFG {','.join(f'{c:g}' for c in b.sample.cfg)} (unless swept).",
        "Metrics: SWD (Laplacian-pyramid sliced Wasserstein x1e3, against the training data); judge acc / FD "
        "(in-domain Fashion-MNIST classifier, `cdc/eval/fmnist.py`) when the data is Fashion-MNIST; FID/IS/"
        "precision/recall when the Inception weights are present. ms / image: sampling wall time. "
        "train s: training-loop wall time from metrics.jsonl, summed over every stretch of a resumed run.",
        *([f"Command: `{' '.join(plan.argv)}`"] if plan.argv else []),
        "",
        "![results](results.png)",
    ]
    atomic_write_bytes(
        out / "results.md", to_markdown(rows, cols, f"cdc ablate {sweep.name}", notes).encode()
    )
    return plot(out / "results.png", rows, xkeys, f"cdc ablate {sweep.name}: {sweep.paper}")
