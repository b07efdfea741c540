"""`cdc ablate NAME`: the paper's ablations (Figs. 3-6, Tables 3-6) as resumable sweeps.

A sweep moves one knob (two for the gamma-sigma grid) of a base recipe. Every point is a full run
in its own folder, `OUT/points/<label>/`: the resolved `config.yaml`, the training run `run/`
(cdc.train.loop), `samples/` (cdc.sample.generate) and `result.json` (scores from cdc.eval.scoring / the
Fashion-MNIST judge). The `cfg` and `steps` sweeps train the base once (`OUT/base/`) and only
sample. A point with a `result.json` is reused, and a half-done point resumes (training from its
checkpoint, sampling from its finished PNGs), so an interrupted sweep continues where it stopped.
Under torchrun every rank calls `run_sweep` and takes part in each point; rank 0 scores and
writes. Tables and plots: cdc.ablate.report.

Every point's config is built and validated by `plan` before anything trains, so a bad NAME, a
value the swept key rejects or an unwritable --out is a one-line error up front.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdc.ablate.sweeps import SWEEPS, Sweep, base_config, expand
from cdc.config import Config, ConfigError, from_dict, to_dict
from cdc.fileio import check_out_path, write_json
from cdc.redact import redact_obj, redacted_yaml
from cdc.train import checkpoint as ckpt_lib
from cdc.train import distributed as D
from cdc.train.run_files import read_metrics, run_budget

DEFAULT_SAMPLES = 500
REF_IMAGES = 10_000  # reference images for FID/PR statistics (SWD uses its own 1024)


@dataclass
class Point:
    label: str  # folder name under OUT/points/
    value: dict[str, Any]  # swept key -> value, as shown in the table
    cfg: Config


@dataclass
class Plan:
    sweep: Sweep
    out: Path
    base: Config
    points: list[Point]
    recipe: str  # the base recipe's path (or the default's)
    n_samples: int
    default_data: bool  # the default recipe's Fashion-MNIST shards may be prepared on first use
    argv: list[str] = field(default_factory=list)


def _check_writable(out: Path) -> None:
    check_out_path(out, "--out")  # a file or a read-only disk: one line that says so
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out} is not writable ({e.strerror or e}); pick another folder") from None


def plan(
    name: str,
    recipe: str | Path | None = None,
    values: str | None = None,
    out: str | Path | None = None,
    train_steps: int | None = None,
    minutes: float | None = None,
    samples: int = DEFAULT_SAMPLES,
    steps: str | None = None,
    cfg: float | str | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> Plan:
    """Resolve and validate every point of sweep `name`; nothing is trained or written but --out."""
    if name not in SWEEPS:
        raise ConfigError(
            f"unknown ablation {name!r}; choose one of {', '.join(SWEEPS)} (see cdc ablate --list)"
        )
    s = SWEEPS[name]
    if samples < 2:
        raise ConfigError(f"-n/--num-images must be >= 2, got {samples}")
    if train_steps is not None and train_steps < 1:
        raise ConfigError(f"--train-steps must be >= 1, got {train_steps}")
    if minutes is not None and minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes}")
    extra = list(sets)
    extra += [f"train.steps={train_steps}"] if train_steps is not None else []
    extra += [f"train.max_minutes={minutes}"] if minutes is not None else []
    extra += [f"sample.steps=[{steps}]"] if steps is not None else []
    extra += [f"sample.cfg=[{cfg}]"] if cfg is not None else []  # one scale or one per stage, as `cdc sample`
    base = base_config(recipe, extra)
    raw = to_dict(base)
    points = []
    for label, shown, ov in expand(s, values, base):
        try:
            points.append(Point(label, shown, from_dict(raw, ov)))
        except ConfigError as e:
            raise ConfigError(f"{name} value {', '.join(map(str, shown.values()))}: {e}") from None
    default_data = recipe is None
    if not default_data:
        from cdc.data.loader import resolve_shards

        resolve_shards(base.data.shards)  # missing data is an error now, not after the first point
    out = Path(out) if out is not None else Path("runs") / "ablate" / name
    if D.init().main:
        _check_writable(out)
    shown = str(recipe) if recipe is not None else "cdc/assets/ablate-base.yaml (the default)"
    return Plan(s, out, base, points, shown, samples, default_data)


# ---------------------------------------------------------------------------------------------
# running


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _same_config(folder: Path, cfg: Config, what: str) -> None:
    """A folder reused on resume must hold a run of exactly this config."""
    f = folder / "config.yaml"
    if not f.is_file():
        return
    old = to_dict(from_dict(yaml.safe_load(f.read_text())))
    new = redact_obj(to_dict(cfg))  # config.yaml is saved redacted
    diff = [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
    if diff:
        raise ConfigError(
            f"{folder} holds a {what} with different settings ({', '.join(diff[:4])}); "
            "use a new --out or the original options"
        )


def is_fashion_mnist(cfg: Config) -> bool:
    """Data the in-domain judge understands: 1-channel, 10 classes, 32 px."""
    return cfg.model.in_channels == 1 and cfg.model.num_classes == 10 and cfg.flow.sides[-1] == 32


def _inception_available() -> bool:
    from cdc.eval.inception import resolve_weights

    try:
        resolve_weights(None, download=False)
        return True
    except FileNotFoundError:
        return False


def count_point_params(cfg: Config) -> int:
    """The model's parameter count, built on the meta device: no weights are allocated (a real
    `k4` with a DiT per stage would take ~11 GB just to be counted)."""
    import torch

    from cdc.nn.model import build_model, count_params

    with torch.device("meta"):
        return count_params(build_model(cfg))


def train_summary(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """A trained run's row fields, from its metrics.jsonl: every stretch of a resumed run counts.

    train_seconds sums the loop time of all stretches and global_batch is batch_size x grad_accum x
    processes as logged (cdc.train.run_files.run_budget).
    """
    lines = read_metrics(run_dir / "metrics.jsonl")
    speed = [x["images_per_s"] for x in lines[1:]] or [x["images_per_s"] for x in lines]
    return {
        "train_steps": lines[-1]["step"] if lines else 0,
        "train_images_per_s": sum(speed) / len(speed) if speed else None,
        **run_budget(lines, cfg.train.batch_size),
        "loss": lines[-1]["loss"] if lines else None,
        "params": count_point_params(cfg),
    }


def _train_point(cfg: Config, folder: Path, progress: bool) -> dict[str, Any]:
    """Train (or resume) folder/run; the summary is cached in folder/train.json by rank 0."""
    from cdc.train import loop as T

    done = D.all_gather_objects(_read_json(folder / "train.json") if D.init().main else None)[0]
    if done is not None:
        return done
    if T.train(cfg, folder / "run", progress=progress).get("stopped"):
        # SIGTERM/SIGINT: train saved a checkpoint; stop the sweep instead of scoring a half-trained point
        raise KeyboardInterrupt
    summary: dict[str, Any] = {}
    if D.init().main:
        summary = train_summary(cfg, folder / "run")
        write_json(folder / "train.json", summary)
    D.barrier()
    return summary


def _sample_point(ckpt_dir: Path, cfg: Config, folder: Path, n: int, progress: bool) -> dict[str, Any]:
    from cdc.sample.generate import generate

    out = folder / "samples"
    old = D.all_gather_objects(_read_json(out / "samples.json") if D.init().main else None)[0]
    if old is not None and old.get("status") == "done" and old.get("n") == n:
        return old
    s = cfg.sample
    summary = generate(
        str(ckpt_dir), out, n=n, classes="all", steps=s.steps, cfg=s.cfg, solver=s.solver, seed=s.seed,
        batch=s.batch, interval=s.interval, sde_eps=s.sde_eps, resume=old is not None, progress=progress,
        guide=s.guide, guide_scale=s.guide_scale,
    )  # fmt: skip
    return D.all_gather_objects(summary)[0]


def _reference(p: Plan, inception: bool) -> Path:
    """OUT/reference.npz from the base recipe's training data (SWD; FID/PR with Inception weights)."""
    from cdc.eval.scoring import build_reference

    ref = p.out / "reference.npz"
    if not ref.is_file():
        _log(f"==> reference statistics from {p.base.data.shards} -> {ref}")
        build_reference(p.base.data.shards, ref, side=p.base.flow.sides[-1], n=REF_IMAGES,
                        metrics="fid,pr,swd" if inception else "swd", progress=False)  # fmt: skip
    return ref


def score_point(samples: Path, ref: Path, cfg: Config, inception: bool, judge: Path | None) -> dict[str, Any]:
    """Metrics of one point's samples.npz: SWD always; FID/IS/PR with Inception; judge on Fashion-MNIST."""
    from cdc.eval.scoring import score

    ms = "fid,is,pr,swd" if inception else "swd"
    m = score(samples, ref, ms, progress=False)["metrics"]
    res: dict[str, Any] = {"swd": m["swd"]["mean"]}
    for k in ("fid", "is", "precision", "recall"):
        if k in m:
            res[k] = m[k]
    if judge is not None and is_fashion_mnist(cfg):
        from cdc.eval.fmnist import evaluate

        ev = evaluate(samples, clf=judge)
        res.update(judge_accuracy=ev["accuracy"], judge_fd=ev["fd_clf"])
    return res


def run_sweep(p: Plan, progress: bool = True, judge: str | Path | None = "auto") -> list[dict[str, Any]]:
    """Run (or resume) every point of the plan; returns the result rows (rank 0; others get [])."""
    from cdc.ablate import report as ablate_report

    dist = D.init()
    main = dist.main
    if p.default_data and main and not (Path(p.base.data.shards) / "manifest.json").is_file():
        from cdc.data.prepare import prepare

        _log(f"==> preparing the bundled Fashion-MNIST subset (4 levels) -> {p.base.data.shards}")
        prepare("fashion-mnist", p.base.data.shards, levels=4, progress=False)
    D.barrier()
    inception = _inception_available()
    judge_path: Path | None = None
    if judge == "auto":
        from cdc.eval.fmnist import DEFAULT_CLF

        judge_path = DEFAULT_CLF if is_fashion_mnist(p.base) else None
    elif judge is not None:
        judge_path = Path(judge)
    ref = _reference(p, inception) if main else None
    if main and judge_path is not None and is_fashion_mnist(p.base):
        from cdc.eval.fmnist import load_or_train

        load_or_train(judge_path)  # trained once (about a minute) and cached before the first point
    if main:
        write_json(p.out / "sweep.json", {"name": p.sweep.name, "keys": list(p.sweep.keys), "paper": p.sweep.paper,
                                           "recipe": p.recipe, "samples": p.n_samples,
                                           "points": [pt.label for pt in p.points], "argv": p.argv})  # fmt: skip
        ckpt_lib.atomic_write_bytes(p.out / "base.yaml", redacted_yaml(to_dict(p.base)).encode())
    base_train: dict[str, Any] = {}
    if not p.sweep.train:  # cfg / steps: one training run, sampled at every value
        _log(f"==> training the base recipe once -> {p.out / 'base'}")
        if main:
            _same_config(p.out / "base", p.base, "base run")
        base_train = _train_point(p.base, p.out / "base", progress)
    rows = []
    for i, pt in enumerate(p.points):
        folder = p.out / "points" / pt.label
        res = D.all_gather_objects(_read_json(folder / "result.json") if main else None)[0]
        if res is not None:
            _log(f"==> [{i + 1}/{len(p.points)}] {pt.label}: done, reused")
            rows.append(res)
            continue
        if main:
            _same_config(folder, pt.cfg, "point")
            folder.mkdir(parents=True, exist_ok=True)
            ckpt_lib.atomic_write_bytes(folder / "config.yaml", redacted_yaml(to_dict(pt.cfg)).encode())
        D.barrier()
        _log(
            f"==> [{i + 1}/{len(p.points)}] {pt.label}: "
            + ("train, " if p.sweep.train else "")
            + "sample, score"
        )
        tr = _train_point(pt.cfg, folder, progress) if p.sweep.train else base_train
        ckpt_dir = folder / "run" if p.sweep.train else p.out / "base" / "run"
        sm = _sample_point(ckpt_dir, pt.cfg, folder, p.n_samples, progress)
        if main:
            sc = score_point(folder / "samples" / "samples.npz", ref, pt.cfg, inception, judge_path)
            res = {"point": pt.label, **pt.value, **tr, "nfe": sm.get("nfe"),
                   "sample_sec_per_image": sm.get("sec_per_image"), "samples": p.n_samples, **sc}  # fmt: skip
            write_json(folder / "result.json", res)
            rows.append(res)
            ablate_report.write(p.out, p.sweep, rows, p)  # tables so far, in case the sweep is cut short
            _log("    " + ", ".join(f"{k} {v:.4g}" for k, v in sc.items()))
        D.barrier()
    if main:
        ablate_report.write(p.out, p.sweep, rows, p)
    D.barrier()  # ranks leave together (an early teardown could hang under torch 2.4's gloo)
    return rows if main else []
