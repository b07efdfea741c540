"""`cdc tune sampler RUN`: coordinate descent over the sampler settings of a finished run.

From the run's own `sample` settings, one coordinate at a time (solver, the autoguidance weight of
the refinements and of stage 1, the CFG scale of the refinements and of stage 1, the CFG interval,
the split of model evaluations over stages at the same total, and the EMA length when the run has
post-hoc EMA snapshots of the checkpoint's step, rebuilt in memory), every candidate value is sampled
on images 0..n-1 and scored by cdc.tune.objective; the best moves on. The winner and the run's
own settings are then re-scored on images n..(1 + heldout_blocks) n, whose noise no choice saw.

Resumable: every trial is one JSON line appended (and flushed) to OUT/sampler.jsonl as it ends; a
rerun replays the same deterministic descent and skips every trial already on file. Writes only
under OUT and RUN/sample.yaml (the chosen `sample` section, atomically), which `cdc sample`, `cdc
upscale` and the Python API then use as the run's defaults; never a checkpoint. The result also
carries the `cdc sample` command with the chosen options spelled out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc.tune.objective import Calibration, Objective, calibrate, combine, measure
from cdc.tune.posthoc_weights import PosthocWeights

COORDS = ("solver", "guide_rest", "cfg_rest", "cfg_first", "guide_first", "interval", "steps", "ema")
SOLVERS = ("euler", "heun", "sde")
CFG_FIRST = (1.5, 2.0, 2.5, 3.0)  # stage 1 decides the class: it has kept more CFG than the refinements
CFG_REST = (1.0, 1.5, 2.0, 2.5)
GUIDE = (1.0, 1.5, 2.0, 2.5)  # autoguidance weight; 1 = off
INTERVALS = ((0.0, 1.0), (0.2, 1.0), (0.0, 0.8), (0.2, 0.8))  # CFG for tau in [lo, hi) of each stage
EMA_LENGTHS = (0.05, 0.10, 0.15, 0.20)  # sigma_rel rebuilt from post-hoc EMA snapshots (cdc.tune.ema)


@dataclass(frozen=True)
class Setting:
    """One point of the search: what `cdc sample` takes, per stage where it can."""

    solver: str
    steps: tuple[int, ...]  # model evaluations per stage
    cfg: tuple[float, ...]  # CFG scale per stage
    interval: tuple[float, float]
    guide_scale: tuple[float, ...]  # autoguidance weight per stage; all 1 = no autoguidance
    ema: float = 0.0  # EMA length sigma_rel rebuilt post hoc; 0 = the checkpoint's own EMA

    def key(self) -> str:
        d = asdict(self)
        if not d["ema"]:
            del d["ema"]  # the checkpoint's own EMA: the key of a search without EMA lengths
        return json.dumps(d, sort_keys=True)

    @property
    def guided(self) -> bool:
        return any(w != 1.0 for w in self.guide_scale)

    def options(self, guide: str) -> dict[str, Any]:
        """Keyword options of cdc.sample.job.resolve_job (the run's guide checkpoint `guide`)."""
        return {
            "steps": list(self.steps), "cfg": list(self.cfg), "solver": self.solver, "interval": list(self.interval),
            "guide": guide if self.guided else "none", "guide_scale": list(self.guide_scale) if self.guided else None,
        }  # fmt: skip

    def cli(self, guide: str) -> str:
        """The same as `cdc sample` options."""

        def nums(v) -> str:
            return ",".join(f"{x:g}" for x in v)

        g = f"--guide {guide} --guide-scale {nums(self.guide_scale)}" if self.guided else "--guide none"
        return (
            f"--solver {self.solver} --steps {nums(self.steps)} --cfg {nums(self.cfg)} "
            f"--interval {nums(self.interval)} {g}"
        )

    def label(self) -> str:
        g = ",".join(f"{x:g}" for x in self.guide_scale) if self.guided else "off"
        return (
            f"{self.solver} steps {','.join(map(str, self.steps))} cfg {','.join(f'{x:g}' for x in self.cfg)} "
            f"int {self.interval[0]:g}-{self.interval[1]:g} ag {g}"
            + (f" ema {self.ema:g}" if self.ema else "")
        )


@dataclass
class TuneResult:
    finished: bool  # False: stopped at max_trials; rerun to continue
    trials: list[dict[str, Any]]  # every trial record of this descent, in order
    base: Setting
    best: Setting | None = None
    heldout: dict[str, dict[str, float]] = field(default_factory=dict)  # "base"/"best" -> mean figures
    calibration: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    wall_s: float = 0.0
    new_trials: int = 0


def per_stage(v, K: int, conv=float) -> tuple:
    vals = [conv(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
    return tuple(vals * K if len(vals) == 1 else vals)


def base_setting(sample_cfg, K: int, guided: bool) -> Setting:
    """The run's own sampler settings (its checkpoint's `sample` config)."""
    return Setting(
        solver=sample_cfg.solver, steps=per_stage(sample_cfg.steps, K, int), cfg=per_stage(sample_cfg.cfg, K),
        interval=tuple(float(v) for v in sample_cfg.interval),
        guide_scale=per_stage(sample_cfg.guide_scale, K) if guided else (1.0,) * K,
    )  # fmt: skip


def step_splits(steps: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The same total of model evaluations split otherwise: even, and a twelfth or a sixth of the
    total moved from stage 1 to the last stage (where fine detail is made), and back."""
    K, total = len(steps), sum(steps)
    even = tuple(total // K + (1 if k < total % K else 0) for k in range(K))
    out = [steps, even]
    for d in (round(total / 12), round(total / 6), -round(total / 12)):
        s = list(even)
        s[0], s[-1] = s[0] - d, s[-1] + d
        if min(s) >= 1:
            out.append(tuple(s))
    return out


def candidates(s: Setting, coord: str, guided: bool, posthoc: bool = False) -> list[Setting]:
    """s with one coordinate set to each of its values (s itself first, no repeats); the guide's
    weights only with a guide, EMA lengths only with post-hoc EMA snapshots of the checkpoint's step."""
    K = len(s.steps)
    if coord == "solver":
        cands = [replace(s, solver=v) for v in SOLVERS]
    elif coord == "cfg_first":
        cands = [replace(s, cfg=(v, *s.cfg[1:])) for v in CFG_FIRST]
    elif coord == "cfg_rest":
        cands = [replace(s, cfg=(s.cfg[0], *[v] * (K - 1))) for v in CFG_REST]
    elif coord == "guide_first":
        cands = [replace(s, guide_scale=(v, *s.guide_scale[1:])) for v in GUIDE] if guided else []
    elif coord == "guide_rest":
        cands = [replace(s, guide_scale=(s.guide_scale[0], *[v] * (K - 1))) for v in GUIDE] if guided else []
    elif coord == "interval":
        cands = [replace(s, interval=v) for v in INTERVALS]
    elif coord == "steps":
        cands = [replace(s, steps=v) for v in step_splits(s.steps)]
    elif coord == "ema":
        cands = [replace(s, ema=v) for v in (0.0, *EMA_LENGTHS)] if posthoc else []
    else:
        raise ValueError(f"unknown coordinate {coord!r}; choose from {', '.join(COORDS)}")
    out = [s]
    for c in cands:
        if c not in out:
            out.append(c)
    return out


class TrialLog:
    """OUT/sampler.jsonl: one record per finished trial, appended and flushed; a torn last line (an
    interruption mid-write) is ignored and rewritten by the rerun."""

    def __init__(self, path: Path, ckpt: str, step: int, judge: str):
        self.path, self.ident = path, {"ckpt": ckpt, "step": step, "judge": judge}
        self.done: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and all(rec.get(k) == v for k, v in self.ident.items()):
                    self.done[rec["id"]] = rec

    @staticmethod
    def ident_of(phase: str, key: str, first: int, n: int) -> str:
        return f"{phase}|{first}|{n}|{key}"

    def append(self, rec: dict[str, Any]) -> None:
        rec = {**self.ident, **rec}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_bytes() if self.path.is_file() else b""
        with open(self.path, "ab") as f:
            if text and not text.endswith(b"\n"):
                f.write(b"\n")  # end a torn line so this record stands on its own
            f.write((json.dumps(rec) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.done[rec["id"]] = rec


class _Stop(Exception):
    """max_trials new trials were run."""


def run_dir_of(run: str | Path) -> Path:
    """The run directory (it holds checkpoints/); a checkpoint file inside one names its run."""
    p = Path(run)
    if p.is_file() and p.parent.name == "checkpoints":
        p = p.parent.parent
    if not (p / "checkpoints").is_dir():
        raise ValueError(
            f"{run}: not a training run directory (no checkpoints/ in it); pass the run's --run-dir"
        )
    return p


def tune_sampler(
    run: str | Path,
    objective: Objective,
    n: int = 300,
    out: str | Path | None = None,
    passes: int = 1,
    max_trials: int | None = None,
    heldout_blocks: int = 2,
    coords: tuple[str, ...] = COORDS,
    device: str | None = None,
    batch: int | None = None,
    write_defaults: bool = True,
    log: Callable[[str], None] | None = None,
    start: Setting | None = None,
) -> TuneResult:
    """Search the run's sampler settings (module doc); returns the trials, the winner and its held-out
    figures. `max_trials` stops after that many new trials (finished=False; rerun to continue).
    `start`: begin the descent there instead of at the run's own settings (which stay the held-out
    baseline); with coords=() this re-scores `start` against the run's own settings."""
    from cdc.sample.api import load

    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    if n < 2 or heldout_blocks < 1 or passes < 1:
        raise ValueError(
            f"need n >= 2, heldout_blocks >= 1 and passes >= 1 (got {n}, {heldout_blocks}, {passes})"
        )
    for c in coords:
        candidates(Setting("euler", (1,), (1.0,), (0.0, 1.0), (1.0,)), c, True)  # unknown names: one line
    run_dir = run_dir_of(run)
    out = Path(out) if out is not None else run_dir / "tune"
    if out.resolve() == (run_dir / "checkpoints").resolve():
        raise ValueError(f"--out {out}: that is the run's checkpoint folder; tune results go elsewhere")
    gen = load(run_dir, device=device)
    m = gen.config.model
    objective.check_fits(m.in_channels, gen.config.flow.sides[-1], m.num_classes)
    guide = gen.config.sample.guide
    guided = bool(guide) and _guide_exists(guide, Path(gen.info["path"]))
    K = len(gen.config.flow.sides)
    posthoc = PosthocWeights(run_dir, gen.model, gen.info["step"])
    trial_log = TrialLog(out / "sampler.jsonl", gen.info["path"], gen.info["step"], objective.name)
    cal = _calibration(trial_log, objective, n)
    base = base_setting(gen.config.sample, K, guided)
    res = TuneResult(finished=False, trials=[], base=base, calibration=cal.to_dict())
    budget = [max_trials]

    def score(s: Setting, first: int, phase: str) -> dict[str, Any]:
        rid = TrialLog.ident_of(phase, s.key(), first, n)
        if rid in trial_log.done:
            return trial_log.done[rid]
        if budget[0] is not None and res.new_trials >= budget[0]:
            raise _Stop
        t = time.perf_counter()
        posthoc.use(s.ema)
        x, y = _sample(gen, s, guide, first, n, batch)
        rec = {"id": rid, "phase": phase, "first": first, "n": n, "setting": asdict(s), "label": s.label()}
        rec.update(measure(objective, x, y, seed=first))
        rec.update(combine(rec, cal))
        rec["seconds"] = time.perf_counter() - t
        trial_log.append(rec)
        res.new_trials += 1
        log(f"{phase} {first}..{first + n - 1}: {s.label()}: FD {rec['fd']:.2f} acc {rec['accuracy']:.3f} "
            f"swd_fine {rec['swd_fine']:.4f} blur {rec['blur_px']:.2f} px -> {rec['objective']:.3f} ({rec['seconds']:.0f} s)")  # fmt: skip
        return rec

    try:
        best = _descend(start or base, coords, passes, (guided, posthoc.available), score, res.trials)
        res.best = best
        for name, s in (("base", base), ("best", best)):
            blocks = [score(s, n * (b + 1), "heldout") for b in range(heldout_blocks)]
            res.heldout[name] = _mean(blocks)
    except _Stop:
        log(f"stopped after {res.new_trials} new trials (max_trials); run again to continue")
        res.wall_s = time.perf_counter() - t0
        return res
    res.finished = True
    res.command = _command(run_dir, best, guide, gen.info["step"])
    res.wall_s = time.perf_counter() - t0
    from cdc.tune.report import write_report

    write_report(out, res, guide)
    if write_defaults:
        write_sample_defaults(run_dir, best, guide)
    return res


def _command(run_dir: Path, best: Setting, guide: str, step: int) -> str:
    """The `cdc sample` command of `best`; an EMA length is first rebuilt as a checkpoint by `cdc tune ema`."""
    if not best.ema:
        return f"cdc sample --ckpt {run_dir} {best.cli(guide)}"
    from cdc.tune.ema import output_path

    ckpt = output_path(run_dir, best.ema, step)
    return f"cdc tune ema {run_dir} --sigma-rel {best.ema:g} && cdc sample --ckpt {ckpt} {best.cli(guide)}"


def _guide_exists(guide: str, ckpt: Path) -> bool:
    from cdc.train import checkpoint as ckpt_lib

    try:
        return ckpt_lib.guide_path(guide, ckpt).is_file()
    except (OSError, ValueError):
        return False


def _calibration(trial_log: TrialLog, objective: Objective, n: int) -> Calibration:
    rid = TrialLog.ident_of("calibration", "real-blocks", 0, n)
    if rid in trial_log.done:
        rec = trial_log.done[rid]
        return Calibration(**{k: rec[k] for k in Calibration.__dataclass_fields__})
    cal = calibrate(objective, n)
    trial_log.append({"id": rid, "phase": "calibration", **cal.to_dict()})
    return cal


def _descend(base: Setting, coords, passes: int, have: tuple[bool, bool], score, trials: list) -> Setting:
    """Coordinate descent: each coordinate's candidates around the current best, in order, `passes` times."""
    start = score(base, 0, "trial")
    trials.append({**start, "coord": "start"})
    best, best_obj = base, start["objective"]
    for _ in range(passes):
        for coord in coords:
            for s in candidates(best, coord, *have)[1:]:
                rec = score(s, 0, "trial")
                trials.append({**rec, "coord": coord})
                if rec["objective"] < best_obj:
                    best, best_obj = s, rec["objective"]
    return best


def _mean(recs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("fd", "accuracy", "swd_fine", "spec_hf", "blur_px", "fd_term", "detail_term", "objective")
    out = {k: float(np.mean([r[k] for r in recs])) for k in keys}
    if len(recs) > 1:
        out.update({f"{k}_sd": float(np.std([r[k] for r in recs], ddof=1)) for k in keys})
    out["images"] = sum(r["n"] for r in recs)
    return out


def _sample(
    gen, s: Setting, guide: str, first: int, count: int, batch: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images first..first+count-1 of setting s, as `cdc sample` makes them (per-image seeds and
    labels), quantised as saved: float (count, C, S, S) in [-1, 1] and labels (count,)."""
    from cdc.sample.api import _uint8_nchw
    from cdc.sample.generate import StageTimer, job_guide, job_sampler, sample_batch
    from cdc.sample.job import resolve_job

    job = resolve_job(
        gen.config, gen.info, gen.device, 0, 1, to_folder=False, out=None, n=first + count, classes=None,
        seed=None, batch=batch, stages=False, sde_eps=None, overwrite=False, resume=False, runs_dir=gen._runs_dir,
        bf16=gen._bf16, cuda_graph_side=None, **s.options(guide),
    )  # fmt: skip
    net, opts = job_sampler(job, gen.model, job_guide(job, gen._ema))
    timer, parts = StageTimer(job.sched.K, job.dev), []
    with torch.inference_mode():
        for b0 in range(first, first + count, job.batch):
            res, _ = sample_batch(job, net, opts, list(range(b0, min(b0 + job.batch, first + count))), timer)
            parts.append(_uint8_nchw(res.x))
    x = torch.cat(parts).float() / 127.5 - 1  # (count, C, S, S), the 256 levels a PNG holds
    return x, torch.as_tensor(job.labels[first:], dtype=torch.long)


def write_sample_defaults(run_dir: Path, s: Setting, guide: str) -> Path:
    """RUN/sample.yaml: s as the `sample` section every checkpoint of the run is sampled with
    (cdc.train.checkpoint.tuned_sample), checked against the run's config and written atomically;
    config.yaml stays the record of what trained."""
    from cdc import config as C
    from cdc.fileio import atomic_write_bytes, bad_file, read_yaml
    from cdc.redact import redacted_yaml
    from cdc.train.checkpoint import TUNED_SAMPLE

    f = run_dir / "config.yaml"
    raw = read_yaml(f, "a cdc run config") if f.is_file() else None
    if not isinstance(raw, dict):
        raise bad_file(f, "a cdc run config (its training writes it)", "missing or not a mapping")
    sample = dict(
        solver=s.solver, steps=list(s.steps), cfg=list(s.cfg), interval=list(s.interval),
        guide=guide if s.guided else "", guide_scale=list(s.guide_scale) if s.guided else [1.0],
    )  # fmt: skip
    C.from_dict({**raw, "sample": {**(raw.get("sample") or {}), **sample}})  # a one-line error before any write
    out = run_dir / TUNED_SAMPLE
    atomic_write_bytes(out, redacted_yaml({"sample": sample}).encode())
    return out
