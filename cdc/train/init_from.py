"""`train.init` / `cdc train --init`: a fresh run that starts from another checkpoint's weights
(a run dir, a checkpoint file, or a `cdc export` folder: a downloaded model fine-tuned or grown).

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
from cdc.nn.stage_models import StageDiTs
from cdc.train import checkpoint as ckpt
from cdc.train import exported


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
            raise ConfigError(
                "fewstep.teacher=init needs a checkpoint to fine-tune: --init RUN_DIR|FILE|EXPORT_DIR (train.init)"
            )
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
    weights, icfg = _read(path)
    grown = _grow_pos_side(cfg, icfg, path)
    mine, theirs = to_dict(cfg), to_dict(icfg)
    for d in (mine, theirs):  # 0 means the final side: compare the grid the positions are in
        d["model"]["pos_side"] = d["model"]["pos_side"] or d["flow"]["sides"][-1]
    diff = [f"model.{k}" for k, v in mine["model"].items() if k != "step_cond" and theirs["model"].get(k) != v]
    same_flow = ("sigma", "gamma", "interpolant", "predict", "timesteps")  # the task; not bounds
    same_flow += () if grown else ("sides",)  # growing by one stage is the one change of sides allowed
    diff += [f"flow.{k}" for k in same_flow if theirs["flow"][k] != mine["flow"][k]]
    if diff:
        raise ConfigError(
            f"train.init {path} was trained with different {', '.join(diff)}; fine-tune with its recipe"
        )
    return weights, icfg


def _read(path: Path) -> tuple[dict, Config]:
    """(EMA weights, config) of a checkpoint file, or of the `cdc export` folder whose
    model.safetensors `path` is (its weights are the run's EMA; its config.json the network)."""
    if exported.is_export(path):
        weights, icfg, _ = exported.read_export(path)
        return weights, icfg
    state = ckpt.load(path)
    with ckpt.reading(path):
        try:
            icfg = from_dict(state["config"])
        except ConfigError as e:
            raise ckpt.BadCheckpointError(f"train.init {path}: its stored config is unusable ({one_line(e)})") from None
    return (state.get("ema") or state["model"]), icfg


def _grow_pos_side(cfg: Config, icfg: Config, path: Path) -> bool:
    """Whether this run grows the init's run by one stage (its sides plus one finer side); if so,
    pin model.pos_side to the init's final side (0 in the recipe), so that positions keep the units
    the old stages were trained in. A grown run's config.yaml records it, so resume and sample agree."""
    old, new = list(icfg.flow.sides), list(cfg.flow.sides)
    if new == old:
        return False
    if new[:-1] != old:
        raise ConfigError(
            f"train.init {path} was trained with flow.sides {old}; this recipe has {new}: growing adds "
            f"exactly one finer side ({old + ['S']}), anything else needs its recipe"
        )
    if not cfg.model.pos_side:
        cfg.model.pos_side = icfg.model.pos_side or old[-1]
    return True


def _load_into(model: torch.nn.Module, weights: dict, path: str, grown: bool = False) -> None:
    """Load init weights; only the step-size embedding (model.step_cond) may be new (zero-init).

    A run grown by one stage (`grown`) loads every old weight unchanged: the unified DiT has no
    weight shaped by the number of stages (the resolution embedding is an MLP of the grid side, see
    docs/design-notes.md, "Growing a stage"); with model.stage_models the new stage's DiT starts as
    a copy of the last old stage's, the stage whose task (refining an upsampled image) it repeats.
    """
    if grown and isinstance(model, StageDiTs):
        last, new = f"nets.{len(model.nets) - 2}.", f"nets.{len(model.nets) - 1}."
        weights = {**weights, **{new + k[len(last) :]: v for k, v in weights.items() if k.startswith(last)}}
    own = model.state_dict()
    if bad := [k for k, v in weights.items() if k in own and own[k].shape != v.shape]:
        raise ConfigError(
            f"train.init {path}: {bad[0]} has shape {list(weights[bad[0]].shape)} there, "
            f"{list(own[bad[0]].shape)} here ({len(bad)} such); fine-tune with its recipe"
        )
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
    _load_into(model, weights, cfg.train.init, grown=len(cfg.flow.sides) == len(icfg.flow.sides) + 1)
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


def trunk_names(model: torch.nn.Module, n_init_stages: int) -> list[str]:
    """The shared trunk of a run started from train.init: the transformer blocks the init trained
    (`blocks.*` of the unified DiT; with model.stage_models those of the init's stages' DiTs)."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(model, StageDiTs):
        return [n for n in names if any(n.startswith(f"nets.{k}.blocks.") for k in range(n_init_stages))]
    return [n for n in names if n.startswith("blocks.")]


def param_groups(model: torch.nn.Module, cfg: Config, loaded: tuple[dict, Config] | None) -> list:
    """The optimizer's parameters: all of them in one group, or with train.init and
    train.init_trunk_lr != 1 the trunk in its own group whose "lr_scale" the loop multiplies into
    the lr (kept in the optimizer state, so resume keeps it); at 0 the trunk is frozen instead
    (requires_grad off, not in the optimizer), so its weights stay bit-identical and cost no grads."""
    scale = cfg.train.init_trunk_lr
    if not cfg.train.init or scale == 1.0:
        return list(model.parameters())
    icfg = (loaded or _load(cfg))[1]
    trunk = set(trunk_names(model, len(icfg.flow.sides)))
    named = list(model.named_parameters())
    rest = [p for n, p in named if n not in trunk]
    if scale == 0:
        for n, p in named:
            if n in trunk:
                p.requires_grad_(False)
        return rest
    return [{"params": rest}, {"params": [p for n, p in named if n in trunk], "lr_scale": scale}]
