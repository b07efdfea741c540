"""Evaluation during training (train.eval_every / eval_n): sample the EMA and score it.

Every rank samples its share of eval_n images (rank r: images i = r, r + R, ...; image i has label
i mod classes and noise seeded by (sample.seed, i), cdc.flow.sampler.image_seed), so the images,
and the scores, do not depend on the number of ranks. The recipe's sampler runs without
autoguidance (the guide checkpoint may not exist yet). Rank 0 gathers the images and computes
what the reference allows, and every rank returns the same record:

- SWD per Laplacian level and their mean (cdc.eval.swd), always: against train.eval_ref's stored
  descriptors, or against data.shards' images at the last stage's side when it has none;
- FID, IS, precision / recall with the FID Inception-v3 when train.eval_ref holds its statistics;
- the Fashion-MNIST judge's accuracy and FD-clf (cdc.eval.fmnist) with train.eval_fmnist.

The weights are the train.ema_decay EMA, or with train.eval_sigma_rel > 0 the post-hoc EMA of that
length rebuilt from the snapshots so far and the live profiles (cdc.tune.ema).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc.config import Config, ConfigError, to_dict
from cdc.train import distributed as D

SWD_PER_IMAGE, SWD_SEED = 32, 0  # as `cdc score ref` stores them by default
JUDGE = Path("runs") / "fmnist-classifier.pt"  # the Fashion-MNIST judge `cdc score`'s judge caches


class Evaluator:
    """What every evaluation of one run reuses: the reference's statistics and the networks that
    score (built on rank 0, the first time they are needed)."""

    def __init__(self, cfg: Config, dist: D.Dist):
        self.cfg, self.dist = cfg, dist
        self.ref: dict[str, Any] | None = None  # SWD descriptors, Inception statistics
        self.inception: Any = None

    def check(self) -> None:
        """Refuse before training what would fail at the first evaluation (a reference that does
        not load, Inception weights it needs and this machine lacks): every rank, with rank 0's line."""
        self._agreed(lambda: self._reference() and None)  # the statistics stay on rank 0

    def _agreed(self, fn: Any) -> Any:
        """fn() on rank 0, its result on every rank; its error stops every rank with the same line
        (not one rank raising while the others wait in the next collective)."""
        from cdc.fileio import one_line

        out: dict[str, Any] = {}
        if self.dist.main:
            try:
                out["value"] = fn()
            except (OSError, ValueError) as e:  # ConfigError is a ValueError
                out["error"] = (
                    f"{type(e).__name__}: {one_line(e)}" if not isinstance(e, ConfigError) else one_line(e)
                )
        out = D.all_gather_objects(out)[0]
        if "error" in out:
            raise ConfigError(f"evaluation during training: {out['error']}")
        return out["value"]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, weights: str) -> dict[str, Any]:
        """Sample eval_n images with `model` (named `weights` in the record) and score them."""
        t0 = time.perf_counter()
        idx, images = sample_share(model, self.cfg, self.dist)
        shares = D.all_gather_objects((idx, images))

        def score() -> dict[str, Any]:
            order = np.argsort(np.concatenate([i for i, _ in shares]), kind="stable")
            labels = np.arange(len(order)) % self.cfg.model.num_classes
            return self._score(np.concatenate([x for _, x in shares])[order], labels)

        out = self._agreed(score)  # the same record on every rank
        return {**out, "n": self.cfg.train.eval_n, "weights": weights, "seconds": time.perf_counter() - t0}

    def _score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Every metric the configuration allows for uint8 (N, S, S, C) `images` (rank 0)."""
        from cdc.eval.swd import collect_descriptors, swd_levels

        ref = self._reference()
        desc = collect_descriptors(_images(images), 100, ref["swd_per_image"], len(images), ref["swd_seed"])
        swd = swd_levels(ref["swd"], desc, seed=ref["swd_seed"], device=self.dist.device)
        out: dict[str, Any] = {f"swd_level{k}": v for k, v in enumerate(swd["levels"])}
        out["swd_mean"] = swd["mean"]
        if self.inception is not None:
            out.update(_inception_scores(self.inception, images, ref, self.dist.device))
        if self.cfg.train.eval_fmnist:
            from cdc.eval.fmnist import evaluate

            judged = evaluate(images, labels, clf=JUDGE)
            out.update(fmnist_accuracy=judged["accuracy"], fmnist_fd=judged["fd_clf"])
        return out

    def _reference(self) -> dict[str, Any]:
        """SWD descriptors and Inception statistics to compare with, loaded or computed once."""
        if self.ref is not None:
            return self.ref
        t = self.cfg.train
        ref: dict[str, Any] = {"swd_per_image": SWD_PER_IMAGE, "swd_seed": SWD_SEED}
        if t.eval_ref:
            ref.update(_stored_reference(t.eval_ref))
            if {"fid", "pr"} & set(ref["metrics"]):
                self.inception = _load_inception(t.eval_ref, ref["inception_sha256"], self.dist.device)
        if "swd" not in ref:  # no descriptors stored: the training data's, at the last stage's side
            from cdc.eval.evalio import reference_images
            from cdc.eval.swd import collect_descriptors

            real = reference_images(self.cfg.data.shards, self.cfg.flow.sides[-1], t.eval_n)
            ref["swd"] = collect_descriptors(real, 100, SWD_PER_IMAGE, t.eval_n, SWD_SEED)
        self.ref = ref
        return ref


def sample_share(model: torch.nn.Module, cfg: Config, dist: D.Dist) -> tuple[np.ndarray, np.ndarray]:
    """This rank's images of the evaluation: (their indices, uint8 (n, S, S, C))."""
    from cdc.flow.matching import Schedule, velocity_net_from_config
    from cdc.flow.sampler import image_seed, sample
    from cdc.flow.shortcut import shortcut_mode
    from cdc.sample.figures import to_uint8

    s, dev = cfg.sample, dist.device
    few = shortcut_mode(cfg.model.step_cond, cfg.fewstep.levels, list(s.steps))
    net, sched = velocity_net_from_config(model, cfg.flow), Schedule.from_config(cfg.flow)
    mine = np.arange(dist.rank, cfg.train.eval_n, dist.world)
    bf16 = dev.type == "cuda" and cfg.train.precision == "bf16"
    out = []
    for b0 in range(0, len(mine), s.batch):
        idx = mine[b0 : b0 + s.batch]
        y = torch.as_tensor(idx % cfg.model.num_classes, device=dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            res = sample(
                net, sched, y, [image_seed(s.seed, int(i)) for i in idx], cfg.model.in_channels,
                steps=s.steps, cfg=s.cfg, null_class=cfg.model.num_classes,
                solver="euler" if few else s.solver, interval=tuple(s.interval), sde_eps=s.sde_eps,
                interpolant=cfg.flow.interpolant, step_cond=few,
            )  # fmt: skip
        out.append(to_uint8(res.x))  # (b, S, S, C)
    side, C = cfg.flow.sides[-1], cfg.model.in_channels
    return mine, np.concatenate(out) if out else np.zeros((0, side, side, C), np.uint8)


def _images(arr: np.ndarray) -> Any:
    """uint8 (N, S, S, C) in memory as the Images stream cdc.eval reads."""
    from cdc.eval.evalio import Images

    return Images(len(arr), arr.shape[1], lambda b: (arr[i : i + b] for i in range(0, len(arr), b)), "eval")


def _stored_reference(path: str) -> dict[str, Any]:
    """A `cdc score ref` .npz: its SWD descriptors (and their seed), Inception statistics and metrics."""
    from cdc.eval.reference import load_reference

    try:
        arrays, desc = load_reference(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.eval_ref: {e}") from None
    out: dict[str, Any] = {
        "metrics": list(desc.get("metrics", [])),
        "inception_sha256": desc.get("inception_sha256"),
    }
    levels = sum(k.startswith("swd_") for k in arrays)
    if levels:
        out.update(swd=[arrays[f"swd_{i}"] for i in range(levels)], swd_per_image=desc["swd_per_image"],
                   swd_seed=desc["swd_seed"])  # fmt: skip
    out.update({k: arrays[k] for k in ("mu", "sigma", "feats") if k in arrays})
    return out


def _load_inception(ref: str, digest: str | None, dev: torch.device) -> Any:
    """The FID Inception-v3 whose weights built the reference; missing weights stop the run now."""
    from cdc.eval.inception import load_inception

    try:
        net, wid = load_inception(device=dev, download=False)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(
            f"train.eval_ref {ref} holds FID statistics, but the Inception weights do not load ({e}); "
            "fetch them once with `cdc score` or point train.eval_ref to an SWD-only reference"
        ) from None
    if digest not in (None, wid):
        raise ConfigError(
            f"train.eval_ref {ref} was built with other Inception weights; rebuild it with `cdc score ref`"
        )
    return net


def _inception_scores(
    net: Any, images: np.ndarray, ref: dict[str, Any], dev: torch.device
) -> dict[str, float]:
    """FID (and precision / recall where the reference keeps features) and IS of `images`."""
    from cdc.eval.metrics import frechet_distance, gaussian_stats, inception_features, inception_score

    ims = _images(images)
    pool, logits = inception_features(net, ims.batches(100), ims.n, dev, progress=False)
    out: dict[str, float] = {}
    if "mu" in ref:
        out["fid"] = frechet_distance(*gaussian_stats(pool, "eval samples"), ref["mu"], ref["sigma"])
    out["is"] = inception_score(logits, splits=min(10, len(images)))[0]
    if "feats" in ref:
        from cdc.eval.metrics import precision_recall

        out["precision"], out["recall"] = precision_recall(ref["feats"], pool, k=3, device=dev)
    return out


def evaluate_at(p: Any, evaluator: Evaluator, step: int) -> dict[str, Any]:
    """Score the EMA of training parts `p` (or train.eval_sigma_rel's post-hoc EMA) at `step` on
    every rank, the training RNG left as it was."""
    sigma = p.cfg.train.eval_sigma_rel
    with torch.random.fork_rng(devices=[p.dev] if p.cuda else []):
        if sigma:
            return evaluator(posthoc_model(p, step), f"posthoc:{sigma:.3f}")
        return evaluator(p.ema, "ema")


class TrainingEvaluation:
    """What `cdc.train.loop.train(..., evaluation=TrainingEvaluation)` calls: built once per run
    (the reference checked before the first step), then `at(parts, step)` every train.eval_every.

    The loop takes it as an argument because sampling and scoring sit in parts above training
    (sample, eval); the loop itself never imports them."""

    def __init__(self, cfg: Config, dist: D.Dist):
        self.evaluator = Evaluator(cfg, dist)
        self.evaluator.check()  # a reference that does not load stops the run before any step

    def at(self, p: Any, step: int) -> dict[str, Any]:
        return evaluate_at(p, self.evaluator, step)


def posthoc_model(p: Any, step: int) -> torch.nn.Module:
    """The post-hoc EMA of train.eval_sigma_rel at `step`: the snapshots written before it (their
    writes waited for) and the live profiles, combined on the device."""
    from cdc.nn.model import build_model
    from cdc.train.posthoc_ema import list_snapshots
    from cdc.tune.ema import Source, combine, matching_sources, param_names, solve

    ph, sigma = p.phema, p.cfg.train.eval_sigma_rel
    p.snap_saver.save(p.dist.main, lambda: None, False)  # the snapshot in flight is on disk for every rank
    stored = [(s, path) for s, path in list_snapshots(p.run_dir) if s < step]
    sources, _ = matching_sources(stored, ph.start, ph.sigma_rels)
    sources += [Source(step - ph.start, g, m.state_dict()) for g, m in zip(ph.gammas, ph.profiles)]
    fit = solve(sources, step - ph.start, sigma)
    weights = combine(sources, [fit], param_names(to_dict(p.cfg)), device=p.dev)[0]
    model = build_model(p.cfg).to(p.dev)
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)
