"""`train.init` / `cdc train --init`: a fresh run that starts from another checkpoint's weights.

The few-step fine-tune (cdc.flow.shortcut) starts from an ordinary checkpoint's EMA and, with
`fewstep.teacher: init`, keeps a frozen copy of it as the guided teacher whose d = 0 field anchors
the shortcut targets, guided as `fewstep.cfg` / `fewstep.guide` say. The init path (and the
teacher's autoguide) is pinned to one checkpoint file in the run's config so that a resumed
fine-tune (and its teacher) stays the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cdc.config import Config, ConfigError, from_dict, to_dict
from cdc.fileio import one_line, read_yaml
from cdc.flow.matching import VelocityNet, velocity_net_from_config
from cdc.flow.shortcut import guided_field, guided_twice, guided_twice_message
from cdc.nn.model import build_model
from cdc.train import checkpoint as ckpt


def resolve_init(cfg: Config, run_dir: Path) -> tuple[dict, Config] | None:
    """Pin train.init (see `_pin`) and load it, checked, before the run writes anything: a bad
    --init file then leaves no run directory behind. (EMA weights, config) for start_from_init."""
    s = cfg.sample  # the student's stored sampler must not guide again what fewstep distils in
    if twice := guided_twice(cfg.model.step_cond, cfg.fewstep, s.cfg, s.guide, s.guide_scale):
        asked = {"cfg": f"sample.cfg {s.cfg}", "guide": f"sample.guide {s.guide} (weight {s.guide_scale})"}
        raise ConfigError(guided_twice_message(twice, cfg.fewstep, asked))
    _pin(cfg, run_dir)
    return _load(cfg) if cfg.train.init else None


def _pin(cfg: Config, run_dir: Path) -> None:
    """Pin train.init to one checkpoint file, so a resumed fine-tune keeps the same init/teacher.

    A run dir given as init would otherwise resolve to whatever checkpoint is newest at resume.
    """
    if not cfg.train.init:
        if cfg.model.step_cond and cfg.fewstep.teacher == "init":
            raise ConfigError("fewstep.teacher=init needs a checkpoint to fine-tune: --init RUN_DIR|FILE (train.init)")
        return
    prev = run_dir / "config.yaml"
    if ckpt.list_checkpoints(run_dir / "checkpoints") and prev.is_file():
        raw = read_yaml(prev, "a cdc run config (restore it or use a new --run-dir)")
        old = raw.get("train", {}).get("init") if isinstance(raw, dict) else None
        if old:
            cfg.train.init = str(old)
            cfg.fewstep.guide = str(raw.get("fewstep", {}).get("guide") or "")  # pinned like init
            return
    cfg.train.init = str(ckpt.resolve(cfg.train.init).resolve())
    if cfg.fewstep.guide:  # "step:N" of the teacher's run, a file or a run dir -> one file
        cfg.fewstep.guide = str(ckpt.guide_path(cfg.fewstep.guide, Path(cfg.train.init), key="fewstep.guide"))


def _load(cfg: Config) -> tuple[dict, Config]:
    """(EMA weights, config) of the train.init checkpoint, checked against this run's network."""
    path = Path(cfg.train.init)
    if not path.is_file():
        raise FileNotFoundError(f"train.init checkpoint not found: {path}; restore it or start a new --run-dir")
    state = ckpt.load(path)
    with ckpt.reading(path):
        try:
            icfg = from_dict(state["config"])
        except ConfigError as e:
            raise ckpt.BadCheckpointError(f"train.init {path}: its stored config is unusable ({one_line(e)})") from None
    mine, theirs = to_dict(cfg), to_dict(icfg)
    diff = [f"model.{k}" for k, v in mine["model"].items() if k != "step_cond" and theirs["model"].get(k) != v]
    same_flow = ("sides", "sigma", "gamma", "interpolant", "predict", "timesteps")  # the task; not bounds
    diff += [f"flow.{k}" for k in same_flow if theirs["flow"][k] != mine["flow"][k]]
    if diff:
        raise ConfigError(
            f"train.init {path} was trained with different {', '.join(diff)}; fine-tune with its recipe"
        )
    return (state.get("ema") or state["model"]), icfg


def _load_into(model: torch.nn.Module, weights: dict, path: str) -> None:
    """Load init weights; only the step-size embedding (model.step_cond) may be new (zero-init)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("d_embed.") for k in missing):
        raise ConfigError(
            f"train.init {path}: weights do not fit this network "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); fine-tune with its recipe"
        )


def start_from_init(
    model: torch.nn.Module, cfg: Config, dev: torch.device, loaded: tuple[dict, Config] | None = None
) -> VelocityNet | None:
    """Load the train.init EMA weights (`loaded` by resolve_init, else read now) into `model`; the
    frozen teacher's guided field, or None."""
    weights, icfg = loaded or _load(cfg)
    _load_into(model, weights, cfg.train.init)
    if cfg.fewstep.teacher != "init":
        return None
    teacher = build_model(icfg).to(dev)
    teacher.load_state_dict(weights)
    teacher.requires_grad_(False).eval()
    fs, guide = cfg.fewstep, None
    if fs.guide:
        gmodel = ckpt.load_guide(Path(fs.guide), icfg, ema=True, device=dev, key="fewstep.guide")
        guide = velocity_net_from_config(gmodel, icfg.flow)
    teacher_net = velocity_net_from_config(teacher, icfg.flow)
    # CFG inside sample.interval only, as `cdc sample` guides the teacher (cdc.flow.sampler._guided)
    return guided_field(
        teacher_net, cfg.model.num_classes, fs.cfg, icfg.flow.sides, guide, fs.guide_scale, tuple(cfg.sample.interval)
    )
