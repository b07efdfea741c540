"""`cdc sample` options as the CLI and recipes give them -> checked values (one-line errors).

Per-stage options (`--steps`, `--cfg`, `--guide-scale`) take one value for every stage or one per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

N = TypeVar("N", int, float)


def _number_list(text: str, option: str, example: str, conv: Callable[[str], N]) -> list[N]:
    """'4,4,4' -> [4, 4, 4] (conv=int) or '2,3' -> [2.0, 3.0] (conv=float); a one-line error naming the option."""
    try:
        return [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected {example}, got {text!r}") from None


def _per_stage(value: N | str | list[N], option: str, example: str, conv: Callable, K: int) -> list[N]:
    """One value or one per stage (a number, a comma list or a list) -> K values."""
    if isinstance(value, str):
        value = _number_list(value, option, example, conv)
    vals = [conv(value)] if isinstance(value, (int, float)) else [conv(v) for v in value]
    return vals * K if len(vals) == 1 else vals


def parse_steps(steps: int | str | list[int] | None, default: list[int], K: int) -> list[int]:
    """'24' or '4,4,4,4' or ints -> one count per stage (model evaluations, x2 with CFG)."""
    vals = _per_stage(default if steps is None else steps, "--steps", "a number or a comma list like 4,4,4,4", int, K)
    if len(vals) != K or min(vals) < 1:
        raise ValueError(f"--steps: give one count >= 1 or one per stage ({K} stages), got {vals}")
    return vals


def _weights(value, option: str, noun: str, example: str, K: int) -> float | list[float]:
    """A per-stage weight >= 0 (CFG scale, autoguidance weight) -> one float, or one per stage."""
    vals = _per_stage(value, option, f"a {noun} or a comma list like {example}", float, K)
    if len(vals) != K or min(vals) < 0:
        raise ValueError(f"{option}: give one {noun} >= 0 or one per stage ({K} stages), got {vals}")
    # one number when every stage shares it, so records stay as they were before per-stage scales
    return vals[0] if len(set(vals)) == 1 else vals


def parse_cfg(cfg: float | str | list[float] | None, default: list[float], K: int) -> float | list[float]:
    """'3' or '2,3,3' or numbers -> one scale (a float, as the paper's eq. 77) or one per stage."""
    return _weights(default if cfg is None else cfg, "--cfg", "scale", "2,3,3", K)


def parse_guide(
    guide: str | None, scale: float | str | list[float] | None, default: tuple[str, list[float]], K: int
) -> tuple[str, float | list[float]]:
    """--guide CKPT|step:N and --guide-scale W or W1,W2,W3 -> (guide, weight or one per stage).

    A scale without a guide is an error; a guide without a scale keeps the recipe's weights;
    `--guide none` (or "") turns a recipe's autoguidance off.
    """
    g = default[0] if guide is None else guide.strip()
    if guide is not None and g.lower() in ("", "none"):
        g, default = "", ("", [1.0])
    w = _weights(default[1] if scale is None else scale, "--guide-scale", "weight", "2,2,2", K)
    if not g and w != 1.0:
        raise ValueError("--guide-scale needs --guide CKPT (or step:N, this run's checkpoint at step N)")
    if g.startswith("step:") and not g[5:].isdigit():
        raise ValueError(f"--guide: expected a checkpoint path or step:N such as step:1000, got {g!r}")
    return g, w


def parse_classes(classes: str | list[int] | None, num_classes: int) -> list[int]:
    """'all' (None) -> 0..num_classes-1; '3,5,7' or ints -> that list, each checked to be a valid class."""
    if classes is None or (isinstance(classes, str) and classes.strip().lower() == "all"):
        return list(range(num_classes))
    if isinstance(classes, str):
        classes = _number_list(classes, "--classes", "'all' or a comma list like 3,5,7", int)
    vals = [int(c) for c in classes]
    bad = [c for c in vals if not 0 <= c < num_classes]
    if not vals or bad:
        raise ValueError(f"--classes: need class indices in [0, {num_classes}), got {vals}")
    return vals


def labels_for(n: int, classes: list[int]) -> np.ndarray:
    """Label of image i is classes[i % len(classes)] (int64, (n,))."""
    return np.asarray([classes[i % len(classes)] for i in range(n)], dtype=np.int64)


def parse_interval(
    interval: str | list[float] | tuple[float, float] | None, default: list[float]
) -> list[float]:
    """'LO,HI' or two numbers -> [lo, hi] with 0 <= lo <= hi <= 1 (CFG applies for tau in [lo, hi))."""
    if interval is None:
        return [float(v) for v in default]
    if isinstance(interval, str):
        interval = _number_list(interval, "--interval", "LO,HI such as 0.1,1.0", float)
    lo_hi = [float(v) for v in interval]
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
        raise ValueError(f"--interval: need LO,HI with 0 <= LO <= HI <= 1, got {lo_hi}")
    return lo_hi
