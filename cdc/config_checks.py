"""Checks of a resolved config (cdc.config): single-field ranges first, then the fields that must
agree with each other (heads and width, the stage path, guidance per stage, training, few-step).
Every failure is a ConfigError naming the key(s) and how to fix them; cdc.config.from_dict runs
`validate` on every config it builds, so a bad recipe or `--set` fails before anything is written.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and says how to fix it."""


def _check_guidance(sec: str, cfg: list[float], guide: str, guide_scale: list[float], K: int, run: str) -> None:
    """`sec`.cfg / guide / guide_scale as the sampler takes them: one value or one per stage."""
    for key, vals, noun in ((f"{sec}.cfg", cfg, "scale"), (f"{sec}.guide_scale", guide_scale, "weight")):
        if len(vals) not in (1, K) or min(vals) < 0:
            raise ConfigError(f"{key}: give one {noun} >= 0 or one per stage ({K}), got {vals}")
    if guide_scale != [1.0] * len(guide_scale) and not guide:
        raise ConfigError(f"{sec}.guide_scale != 1 needs {sec}.guide (a checkpoint, or step:N of {run})")


def _check_ranges(cfg: Any) -> None:
    """Single-field bounds, checked before the cross-field checks divide by any of them."""
    m, f, d, t, s = cfg.model, cfg.flow, cfg.data, cfg.train, cfg.sample
    at_least = [  # (key, value, minimum): counts and sizes
        ("model.depth", m.depth, 1), ("model.width", m.width, 1), ("model.heads", m.heads, 1),
        ("model.patch", m.patch, 1), ("model.in_channels", m.in_channels, 1),
        ("model.num_classes", m.num_classes, 1), ("model.head_channels", m.head_channels, 1),
        ("flow.timesteps", f.timesteps, 1), ("data.workers", d.workers, 0), ("data.shuffle", d.shuffle, 0),
        ("train.steps", t.steps, 1), ("train.warmup_steps", t.warmup_steps, 0),
        ("train.keep_last", t.keep_last, 1), ("train.milestone_every", t.milestone_every, 0),
        ("train.max_nonfinite", t.max_nonfinite, 1), ("sample.batch", s.batch, 1),
        ("train.batch_size", t.batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
        ("train.log_every", t.log_every, 1), ("train.check_every", t.check_every, 1),
        # 0 = off for these
        ("train.ckpt_every", t.ckpt_every, 0), ("train.sample_every", t.sample_every, 0),
        ("data.cache_mb", d.cache_mb, 0), ("data.mix_shards", d.mix_shards, 1), ("sample.cuda_graph_side", s.cuda_graph_side, 0),
        ("data.partitions", d.partitions, 0), ("data.cache_gb", d.cache_gb, 0), ("data.max_member_mb", d.max_member_mb, 1),
    ]
    for key, val, lo in at_least:
        if val < lo:
            raise ConfigError(f"{key} must be >= {lo}, got {val}")
    non_negative = [
        ("train.max_minutes", t.max_minutes), ("train.weight_decay", t.weight_decay),
        ("train.lr_min", t.lr_min), ("train.grad_clip", t.grad_clip), ("sample.sde_eps", s.sde_eps),
        ("train.ema_gamma", t.ema_gamma),
    ]
    for key, val in non_negative:
        if val < 0:
            raise ConfigError(f"{key} must be >= 0, got {val}")
    for key, val in (("model.mlp_ratio", m.mlp_ratio), ("train.lr", t.lr), ("train.eps", t.eps),
                     ("train.peak_tflops", t.peak_tflops)):
        if val <= 0:
            raise ConfigError(f"{key} must be > 0, got {val}")
    if min(f.sides, default=1) < 1:
        raise ConfigError(f"flow.sides: every side must be >= 1 px, got {f.sides}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if any(not 0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: each must be in [0, 1), got {t.betas}")


def validate(cfg: Any) -> None:
    """Cross-field checks; each failure is one line naming the key (checked in this order)."""
    m, f, t = cfg.model, cfg.flow, cfg.train
    _check_ranges(cfg)
    _check_heads(m)
    _check_choices(cfg)
    _check_stage_path(f, m)
    if t.init_trunk_lr < 0:
        raise ConfigError(f"train.init_trunk_lr must be >= 0 (0 freezes the trunk), got {t.init_trunk_lr}")
    if m.pos_side and (m.pos_side % m.patch or m.pos_side > f.sides[-1]):
        raise ConfigError(
            f"model.pos_side: {m.pos_side} must be a multiple of model.patch={m.patch} and <= flow.sides[-1]; 0 = sides[-1]"
        )
    if f.tau_scale <= 0:
        raise ConfigError(f"flow.tau_scale must be > 0, got {f.tau_scale}")
    _check_sample(cfg.sample, f)
    _check_train(t)
    _check_posthoc_eval(cfg)
    _check_fewstep(cfg)
    if not 0.0 <= t.label_dropout < 1.0:
        raise ConfigError(f"train.label_dropout must be in [0, 1), got {t.label_dropout}")


def _check_heads(m: Any) -> None:
    """The width splits into heads, and a RoPE head dim into 4 parts (2 axes x cos/sin)."""
    if m.width % m.heads:
        raise ConfigError(f"model.width ({m.width}) must be divisible by model.heads ({m.heads})")
    if m.pos == "rope" and (m.width // m.heads) % 4:
        raise ConfigError(f"model.pos=rope needs a head dim divisible by 4, got {m.width // m.heads}")


def _check_choices(cfg: Any) -> None:
    """Every option that takes one of a few names."""
    m, f, t, s = cfg.model, cfg.flow, cfg.train, cfg.sample
    for key, val, ok in [
        ("model.pos", m.pos, ("rope", "sincos")),
        ("model.pos_units", m.pos_units, ("final", "native")),
        ("model.res_fusion", m.res_fusion, ("xattn", "add")),
        ("model.head", m.head, ("linear", "conv")),
        ("flow.interpolant", f.interpolant, ("linear", "trig", "sbd")),
        ("flow.loss_weight", f.loss_weight, ("pixel_sum", "sample_mean")),
        ("flow.predict", f.predict, ("velocity", "data")),
        ("flow.tau_dist", f.tau_dist, ("uniform", "logit_normal")),
        ("train.precision", t.precision, ("bf16", "fp32")),
        ("train.schedule", t.schedule, ("constant", "cosine")),
        ("sample.solver", s.solver, ("euler", "heun", "sde")),
    ]:
        if val not in ok:
            raise ConfigError(f"{key}: {val!r} is not one of {list(ok)}")


def _check_stage_path(f: Any, m: Any) -> None:
    """The sides (powers of two apart, the first a multiple of the patch), bounds, noise and weights."""
    if not 0.0 < f.alpha_min < 1.0:
        raise ConfigError(f"flow.alpha_min must be in (0, 1), got {f.alpha_min}")
    if not f.sides:
        raise ConfigError("flow.sides: give at least one side, e.g. [32, 64, 128, 256]")
    for a, b in zip(f.sides, f.sides[1:]):
        if b <= a or b % a or (b // a) & (b // a - 1):
            raise ConfigError(
                f"flow.sides: each side must be a power-of-two multiple of the previous, got {f.sides}"
            )
    if f.sides[0] % m.patch:
        raise ConfigError(f"flow.sides[0]={f.sides[0]} must be a multiple of model.patch={m.patch}")
    if f.bounds is not None:
        b = f.bounds
        if len(b) != len(f.sides) + 1 or b[0] != 0.0 or b[-1] != 1.0 or any(x >= y for x, y in zip(b, b[1:])):
            raise ConfigError(f"flow.bounds: need {len(f.sides) + 1} increasing values from 0 to 1, got {b}")
    if f.sigma <= 0 or f.gamma <= 0:
        raise ConfigError("flow.sigma and flow.gamma must be > 0")
    if f.stage_weights is not None and (
        len(f.stage_weights) != len(f.sides) or min(f.stage_weights) < 0 or sum(f.stage_weights) <= 0
    ):
        raise ConfigError(
            f"flow.stage_weights: need one weight >= 0 per side ({len(f.sides)}), not all 0, got {f.stage_weights}"
        )


def _check_sample(s: Any, f: Any) -> None:
    """sample.steps / cfg / guide per stage, a solver the interpolant allows, the CFG interval."""
    if len(s.steps) not in (1, len(f.sides)) or min(s.steps) < 1:
        raise ConfigError(
            f"sample.steps: give one count >= 1 or one per stage ({len(f.sides)}), got {s.steps}"
        )
    _check_guidance("sample", s.cfg, s.guide, s.guide_scale, len(f.sides), "this run")
    if s.solver == "sde" and f.interpolant != "linear":  # caught here, not after training
        raise ConfigError(
            f"sample.solver: sde derives the score for the linear interpolant only (App. D), not "
            f"flow.interpolant {f.interpolant!r}; use heun or euler"
        )
    if len(s.interval) != 2 or not 0.0 <= s.interval[0] <= s.interval[1] <= 1.0:
        raise ConfigError(f"sample.interval: need [lo, hi] with 0 <= lo <= hi <= 1, got {s.interval}")


def _check_train(t: Any) -> None:
    """train.compile, betas, log backends and the global batch."""
    if t.compile not in (True, False, "auto"):
        raise ConfigError(f"train.compile: {t.compile!r} is not one of true, false, auto")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas: need two values, got {t.betas}")
    for b in t.log:
        if b not in ("jsonl", "tensorboard", "wandb"):
            raise ConfigError(f"train.log: {b!r} is not one of ['jsonl', 'tensorboard', 'wandb']")
    if t.global_batch < 0 or t.global_batch % t.batch_size:
        raise ConfigError(
            f"train.global_batch ({t.global_batch}) must be 0 (off) or a multiple of "
            f"train.batch_size ({t.batch_size})"
        )


def _check_posthoc_eval(cfg: Any) -> None:
    """Post-hoc EMA snapshots and evaluation during training."""
    t = cfg.train
    for key, val in (("train.ema_snapshots", t.ema_snapshots), ("train.eval_every", t.eval_every)):
        if val < 0:
            raise ConfigError(f"{key} must be >= 0 (0 = off), got {val}")
    if t.eval_n < 1:
        raise ConfigError(f"train.eval_n must be >= 1, got {t.eval_n}")
    if t.ema_snapshot_dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(
            f"train.ema_snapshot_dtype: {t.ema_snapshot_dtype!r} is not one of float16, bfloat16, float32"
        )
    top = 0.2887  # sqrt(1/12): a flat average over the whole run
    lengths = [*t.ema_sigma_rels, *([t.eval_sigma_rel] if t.eval_sigma_rel else [])]
    bad = [s for s in lengths if not 0 < s < top]
    if bad:
        raise ConfigError(f"train.ema_sigma_rels / eval_sigma_rel: each must be in (0, {top}), got {bad[0]}")
    if t.ema_snapshots and (len(t.ema_sigma_rels) < 2 or len(set(t.ema_sigma_rels)) != len(t.ema_sigma_rels)):
        raise ConfigError(
            f"train.ema_sigma_rels: post-hoc EMA needs two or more distinct lengths, got {t.ema_sigma_rels} (e.g. [0.05, 0.10])"
        )
    if t.eval_every and t.eval_fmnist and (cfg.model.in_channels != 1 or cfg.flow.sides[-1] != 32):
        raise ConfigError(
            "train.eval_fmnist: the Fashion-MNIST judge scores 32-px greyscale images, not "
            f"{cfg.model.in_channels} channel(s) at {cfg.flow.sides[-1]} px; set it false"
        )
    if t.eval_sigma_rel and not t.ema_snapshots:
        raise ConfigError(
            "train.eval_sigma_rel needs train.ema_snapshots > 0 (it is rebuilt from the snapshots)"
        )


def _check_fewstep(cfg: Any) -> None:
    """The few-step objective's teacher and guidance, and what a step-conditioned model needs of flow."""
    m, f, fs = cfg.model, cfg.flow, cfg.fewstep
    if fs.teacher not in ("none", "init"):
        raise ConfigError(f"fewstep.teacher: {fs.teacher!r} is not one of ['none', 'init']")
    _check_guidance("fewstep", fs.cfg, fs.guide, fs.guide_scale, len(f.sides), "the teacher's run")
    if fs.guide and fs.teacher != "init":
        raise ConfigError("fewstep.guide autoguides the teacher: it needs fewstep.teacher=init")
    if not 0.0 <= fs.fraction <= 1.0 or not 0 <= fs.levels <= 10:
        raise ConfigError(f"fewstep.fraction must be in [0, 1] and fewstep.levels in 0..10, got {fs.fraction}, {fs.levels}")
    if m.step_cond and f.predict != "velocity":
        raise ConfigError("model.step_cond needs flow.predict=velocity (the shortcut is an average velocity)")
    if m.step_cond and f.tau_dist != "uniform":  # an error, not a re-weighting: docs/design-notes.md, Few-step
        raise ConfigError(
            f"flow.tau_dist: {f.tau_dist} with model.step_cond trains almost no tau near the stage ends, "
            "where the shortcut sampler's first and last step of every size d < 1 start (tau = 0, 1 - d); "
            "use flow.tau_dist: uniform for a few-step model (or model.step_cond: false)"
        )
