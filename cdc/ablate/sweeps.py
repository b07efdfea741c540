"""The ablation sweeps of `cdc ablate`: which config keys each one moves, its default values, the
paper figure or table it mirrors, and how `--values` text turns into one config override list per
point. Config work only: nothing here trains, samples or writes (cdc.ablate.runner runs the points);
the one file read is the base recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc.config import Config, ConfigError, load

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "assets" / "ablate-base.yaml"


@dataclass(frozen=True)
class Sweep:
    name: str
    keys: tuple[str, ...]  # config keys the sweep sets (for display; `overrides` does the work)
    values: str  # default values, in --values syntax ("" = derived from the base recipe)
    paper: str  # the figure / table it mirrors
    train: bool = True  # False: sample one trained checkpoint per value (cfg, steps)


SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in [
        Sweep(
            "gamma",
            ("flow.gamma",),
            "1,1.5,2,2.5,3,3.5,4,4.5,5",
            "Fig. 3: FID and sampling time vs gamma (sigma 1)",
        ),
        Sweep("sigma", ("flow.sigma",), "0.25,0.5,1,1.5,2", "Fig. 6: one row of the gamma-sigma grid"),
        Sweep(
            "gamma-sigma",
            ("flow.gamma", "flow.sigma"),
            "1,2,3,4,5x0.5,1,2",
            "Fig. 6: FID over the gamma x sigma grid",
        ),
        Sweep("stages", ("flow.sides",), "", "Table 6: K=4 path vs the 2-stage path (final/4 -> final)"),
        Sweep(
            "interpolant",
            ("flow.interpolant",),
            "linear,trig,sbd",
            "Table 5: linear vs trigonometric vs score-based",
        ),
        Sweep(
            "fusion",
            ("model.res_fusion",),
            "xattn,add",
            "Table 4: resolution embedding by cross-attention vs addition",
        ),
        Sweep(
            "unified",
            ("model.stage_models",),
            "unified,stage-specific",
            "Table 3: one unified DiT vs a DiT per stage",
        ),
        Sweep(
            "loss-weight",
            ("flow.loss_weight",),
            "pixel_sum,sample_mean",
            "eq. 13 pixel sum vs per-sample mean (our choice)",
        ),
        Sweep(
            "tau-dist",
            ("flow.tau_dist",),
            "uniform,logit_normal",
            "not in the paper: uniform vs SD3's logit-normal tau inside each stage",
        ),
        Sweep(
            "pos",
            ("model.pos", "model.pos_units"),
            "rope-final,rope-native,sincos-final",
            "not in the paper: RoPE in final-grid units vs per-stage grid vs sin-cos",
        ),  # fmt: skip
        Sweep(
            "cfg",
            ("sample.cfg",),
            "1,1.5,2,3,4,5,6",
            "Figs. 4/5: FID/IS and precision/recall vs S_cfg",
            False,
        ),
        Sweep(
            "steps",
            ("sample.steps",),
            "1,2,4,8,16",
            "Table 1 / Fig. 2: quality and time vs steps per stage",
            False,
        ),
    ]
}
CHOICES = {  # value -> overrides, for the sweeps whose values are names
    "unified": {"unified": ["model.stage_models=false"], "stage-specific": ["model.stage_models=true"]},
    "pos": {
        f"{p}-{u}": [f"model.pos={p}", f"model.pos_units={u}"]
        for p in ("rope", "sincos")
        for u in ("final", "native")
    },
}


def list_sweeps() -> list[dict[str, Any]]:
    """One entry per NAME: swept keys, default values (with the default recipe) and the paper's figure."""
    base = base_config(None, [])
    return [
        {
            "name": s.name,
            "keys": list(s.keys),
            "values": _default_values(s, base),
            "paper": s.paper,
            "trains": s.train,
        }  # fmt: skip
        for s in SWEEPS.values()
    ]


def base_config(recipe: str | Path | None, overrides: list[str]) -> Config:
    """The sweep's base: RECIPE (or the default Fashion-MNIST base) with --set overrides applied."""
    return load(recipe if recipe is not None else DEFAULT_RECIPE, overrides)


def _default_values(s: Sweep, base: Config) -> str:
    if s.name != "stages":
        return s.values
    S = base.flow.sides[-1]
    return ",".join("-".join(str(S // d) for d in path) for path in ((8, 4, 2, 1), (4, 1)))


def _num(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--values: {what} needs numbers, got {text!r}") from None


def _fmt(v: float) -> str:
    return f"{v:g}"


def expand(s: Sweep, values: str | None, base: Config) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(label, shown values, config overrides) per point, from --values text or the defaults."""
    text = (values if values is not None else _default_values(s, base)).strip()
    if not text:
        raise ConfigError(f"--values: give at least one value for {s.name}")
    items = [v.strip() for v in text.split(",") if v.strip()] if s.name != "gamma-sigma" else []
    pts: list[tuple[str, dict[str, Any], list[str]]] = []
    if s.name == "gamma-sigma":
        if text.count("x") != 1:
            raise ConfigError(f"--values: gamma-sigma takes GAMMAS x SIGMAS, e.g. 1,2,3x0.5,1; got {text!r}")
        gs, ss = ([_num(v, s.name) for v in part.split(",") if v.strip()] for part in text.split("x"))
        for g in gs:
            for sg in ss:
                pts.append((f"g{_fmt(g)}-s{_fmt(sg)}", {"flow.gamma": g, "flow.sigma": sg},
                            [f"flow.gamma={g}", f"flow.sigma={sg}"]))  # fmt: skip
    elif s.name in ("gamma", "sigma", "cfg"):
        key = s.keys[0]
        for v in items:
            x = _num(v, s.name)
            pts.append((f"{s.name}-{_fmt(x)}", {key: x}, [f"{key}={x}"]))
    elif s.name == "steps":
        for v in items:
            if not v.isdigit() or int(v) < 1:
                raise ConfigError(f"--values: steps takes counts >= 1 per stage, e.g. 1,2,4,8; got {v!r}")
            pts.append((f"steps-{int(v)}", {"sample.steps": int(v)}, [f"sample.steps={int(v)}"]))
    elif s.name == "stages":
        for v in items:
            try:
                sides = [int(x) for x in v.split("-")]
            except ValueError:
                raise ConfigError(
                    f"--values: stages takes resolution paths like 4-8-16-32,8-32; got {v!r}"
                ) from None
            if sides[-1] != base.flow.sides[-1]:
                raise ConfigError(
                    f"--values: path {v} must end at the base recipe's final side {base.flow.sides[-1]}"
                )
            # a new path gets equal stage windows and the base's (first) per-stage step count
            ov = [f"flow.sides={sides}", "flow.bounds=null", f"sample.steps={base.sample.steps[0]}"]
            pts.append((f"K{len(sides)}-{v}", {"flow.sides": v}, ov))
    elif s.name in CHOICES:
        for v in items:
            if v not in CHOICES[s.name]:
                raise ConfigError(f"--values: {s.name} takes {', '.join(CHOICES[s.name])}; got {v!r}")
            pts.append((f"{s.name}-{v}", {s.name: v}, CHOICES[s.name][v]))
    else:  # a plain string key
        key = s.keys[0]
        for v in items:
            pts.append((f"{s.name}-{v}", {key: v}, [f"{key}={v}"]))
    labels = [p[0] for p in pts]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--values: repeated value in {text!r}")
    return pts
