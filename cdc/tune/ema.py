"""Post-hoc EMA: any EMA length of a finished run from its power-function EMA snapshots.

EDM2 (Karras et al. 2024, App. C.2): a snapshot of a power EMA with exponent g taken at step t
averages the weights with the kernel k_{t,g}(tau) = (g+1) tau^g / t^(g+1) on [0, t]
(cdc.train.posthoc_ema). The EMA of another exponent g' at step T is approximated by the
combination sum_j c_j snapshot_j whose kernel is closest in L2 to k_{T,g'}: c solves the normal
equations A c = b with A_ij = <k_i, k_j>, b_i = <k_i, k_{T,g'}>, inner products in closed form.
The residual ||sum_j c_j k_j - k_{T,g'}|| / ||k_{T,g'}|| is the fit error every result reports.

`rebuild_ema` writes each result as a new checkpoint beside the run's (never over one of them),
atomically, with its sha256 sidecar; `cdc sample --ckpt` loads it like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc.train import posthoc_ema as PH


@dataclass
class Source:
    """One stored profile: its kernel (step t since the profiles' start, exponent gamma) and its
    weights, or a function that loads them."""

    t: int
    gamma: float
    weights: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]

    def load(self) -> dict[str, torch.Tensor]:
        return self.weights() if callable(self.weights) else self.weights


@dataclass
class Fit:
    """The least-squares combination for one target length."""

    sigma_rel: float
    gamma: float
    t: int  # the target's step since the profiles' start
    coefficients: list[float]  # one per source
    fit_error: float  # relative L2 error of the combined kernel


@dataclass
class Rebuilt:
    """One written post-hoc EMA checkpoint."""

    path: Path
    step: int
    fit: Fit
    snapshots: list[int] = field(default_factory=list)  # the snapshot steps combined


def p_dot_p(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<k_{t_a,g_a}, k_{t_b,g_b}> over [0, inf): the two kernels overlap on [0, min(t_a, t_b)]."""
    ratio = t_a / t_b
    exp = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio**exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve(sources: list[Source], t: int, sigma_rel: float) -> Fit:
    """The coefficients of `sources` that best rebuild the power EMA of `sigma_rel` at step `t`."""
    gamma = PH.sigma_rel_to_gamma(sigma_rel)
    ts = np.array([s.t for s in sources], np.float64).reshape(-1, 1)  # (J, 1)
    gs = np.array([s.gamma for s in sources], np.float64).reshape(-1, 1)
    A = p_dot_p(ts, gs, ts.T, gs.T)  # (J, J)
    b = p_dot_p(ts, gs, np.float64(t), np.float64(gamma))  # (J, 1)
    c = np.linalg.lstsq(A, b, rcond=None)[0]  # lstsq: near-duplicate snapshots leave A near singular
    target = float(p_dot_p(np.float64(t), np.float64(gamma), np.float64(t), np.float64(gamma)))
    err2 = float((c.T @ A @ c - 2 * c.T @ b)[0, 0]) + target
    return Fit(sigma_rel, gamma, t, c[:, 0].tolist(), float(np.sqrt(max(err2, 0.0) / target)))


@torch.no_grad()
def combine(
    sources: list[Source], fits: list[Fit], param_names: Iterable[str], device: torch.device | str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """sum_j c_j weights_j for every fit on `device`, loading each source once (memory: one source
    plus the results). Parameters are combined in fp32; buffers come from the last source."""
    names = set(param_names)
    out: list[dict[str, torch.Tensor]] = [{} for _ in fits]
    for j, src in enumerate(sources):
        w = {k: v.to(device) for k, v in src.load().items()}
        for k, fit in enumerate(fits):
            c = fit.coefficients[j]
            for name, v in w.items():
                if name not in names:
                    out[k][name] = (v.float() if v.is_floating_point() else v).clone()
                elif name in out[k]:
                    out[k][name].add_(v.float(), alpha=c)
                else:
                    out[k][name] = v.float() * c
    return out


def snapshot_sources(run_dir: Path, step: int | None = None) -> tuple[list[Source], list[int], PH.Snapshot]:
    """Every stored profile of the snapshots up to `step` (default: the newest snapshot); the
    snapshot steps used and the newest snapshot."""
    found = PH.list_snapshots(run_dir)
    if not found:
        raise ValueError(
            f"{run_dir} has no post-hoc EMA snapshots ({PH.snapshot_dir(run_dir)} is empty or missing); "
            "train with train.ema_snapshots > 0 (e.g. --set train.ema_snapshots=500)"
        )
    if step is not None and step not in [s for s, _ in found]:
        have = ", ".join(str(s) for s, _ in found[-8:])
        raise ValueError(
            f"--step {step}: no snapshot of that step in {PH.snapshot_dir(run_dir)} (newest: {have})"
        )
    found = [(s, p) for s, p in found if step is None or s <= step]
    last = PH.read_snapshot(found[-1][1])
    sources, steps = matching_sources(found, last.start, last.sigma_rels, {last.step: last})
    return sources, steps, last


def matching_sources(
    found: list[tuple[int, Path]], start: int, sigma_rels: Any, known: dict[int, PH.Snapshot] | None = None
) -> tuple[list[Source], list[int]]:
    """The profiles of the snapshots `found` (step, path) whose profiles began at `start` with these
    lengths, and their steps; `known` holds snapshots already read."""
    sources, steps = [], []
    for s, path in found:
        snap = (known or {}).get(s) or PH.read_snapshot(path)
        if snap.start != start or snap.sigma_rels != sigma_rels:
            continue  # profiles of another start (turned on in a resumed run) or lengths: other kernels
        steps.append(s)
        # memory-mapped: a profile's bytes are read when combined, not here
        sources += [Source(s - snap.start, g, w) for g, w in zip(snap.gammas, snap.profiles)]
    return sources, steps


def param_names(config: dict[str, Any]) -> list[str]:
    """The trained parameters of the network a stored config describes (built without memory)."""
    from cdc.config import from_dict
    from cdc.nn.model import build_model

    with torch.device("meta"):
        return [n for n, _ in build_model(from_dict(config)).named_parameters()]


def output_path(run_dir: Path, sigma_rel: float, step: int, out_dir: Path | None = None) -> Path:
    """RUN/checkpoints/ema-posthoc-0.050-step_0005200.pt: beside the run's checkpoints (a
    `sample.guide: step:N` still finds its checkpoint), never one of their names."""
    return (out_dir or run_dir / "checkpoints") / f"ema-posthoc-{sigma_rel:.3f}-step_{step:07d}.pt"


def rebuild_ema(
    run_dir: str | Path, sigma_rels: list[float], step: int | None = None, out_dir: str | Path | None = None,
    say: Callable[[str], None] = lambda m: None,
) -> list[Rebuilt]:  # fmt: skip
    """Rebuild the EMA of each `sigma_rel` at `step` (default: the newest snapshot) from the run's
    snapshots and write each as a checkpoint (`output_path`); rerunning writes the same files."""
    from cdc.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not sigma_rels:
        raise ValueError("give at least one --sigma-rel, e.g. 0.05")
    for s in sigma_rels:
        PH.sigma_rel_to_gamma(s)  # out of range: one line naming the bound
    sources, steps, last = snapshot_sources(run_dir, step)
    if last.start:
        say(f"note: the profiles start at step {last.start}: lengths are relative to the steps since then")
    fits = [solve(sources, last.step - last.start, s) for s in sigma_rels]
    results = combine(sources, fits, param_names(last.config))
    written = []
    for fit, weights in zip(fits, results):
        path = output_path(run_dir, fit.sigma_rel, last.step, Path(out_dir) if out_dir else None)
        info = {"sigma_rel": fit.sigma_rel, "gamma": fit.gamma, "fit_error": fit.fit_error,
                "snapshot_steps": steps, "start": last.start, "coefficients": fit.coefficients}  # fmt: skip
        # the same tensors under both names: torch.save stores them once; either loads the result
        ckpt.save(
            path,
            {"config": last.config, "model": weights, "ema": weights, "step": last.step, "posthoc": info},
        )
        say(
            f"sigma_rel {fit.sigma_rel:.3f} at step {last.step}: {len(steps)} snapshots, fit error "
            f"{100 * fit.fit_error:.2f}%, sum |c| {sum(map(abs, fit.coefficients)):.2f}"
        )
        written.append(Rebuilt(path, last.step, fit, steps))
    return written
