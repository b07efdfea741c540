"""One config path: typed dataclasses whose defaults are the paper's values (App. J, Table 7).

YAML recipes only override. Unknown keys and values of the wrong type are one-line errors that
name the key. The resolved config is written next to every run and inside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdc.config_checks import ConfigError, validate  # noqa: F401 (ConfigError re-exported: its home for users)

# Named model sizes. `paper` is Table 7 (16 heads x 72 = 1152 wide, depth 28, ~677M params).
# `XL-h64` keeps the width but uses 18 heads x 64, because flash kernels pad head dim 72 to 96.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(depth=2, width=64, heads=2),
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "paper": dict(depth=28, width=1152, heads=16),
    "XL-h64": dict(depth=28, width=1152, heads=18),
}


@dataclass
class ModelConfig:
    preset: str = "paper"  # one of PRESETS; sets depth/width/heads, explicit keys still win
    depth: int = 28  # number of DiT blocks
    width: int = 1152  # token width d_model
    heads: int = 16  # attention heads; head dim = width / heads (72 for the paper)
    patch: int = 4  # patch side in pixels, the same at every stage
    in_channels: int = 3  # image channels (3 RGB, 1 for Fashion-MNIST)
    num_classes: int = 1000  # class labels; index num_classes is the null class for CFG
    mlp_ratio: float = 4.0  # MLP hidden width / width
    pos: str = "rope"  # 2-D positions: "rope" (rotary on q,k) or "sincos" (added to tokens)
    pos_units: str = "final"  # "final": coordinates in final-grid units; "native": per-stage grid
    # side whose token grid the "final" units refer to; 0 = flow.sides[-1]. A run grown by a stage
    # (train.init with one more side) keeps its init's final side, so the old stages see the
    # positions they were trained with and the new stage interpolates between them
    pos_side: int = 0
    res_fusion: str = "xattn"  # resolution-embedding fusion: "xattn" (App. F eq. 41-44) or "add"
    attn_bias: bool = True  # bias in the qkv projection (Table 7)
    qk_norm: bool = False  # RMS-normalise q and k per head (stabilises bf16 at scale)
    dropout: float = 0.0  # dropout in attention/MLP (Table 7: 0)
    head: str = "linear"  # output head: "linear" (DiT: each token -> its p*p*C pixels) | "conv" (see below)
    head_channels: int = 16  # head=conv: per-pixel feature maps the tokens emit for the two 3x3 convs
    stage_models: bool = False  # Table 3 ablation: a separate DiT of this size per stage (K x params)
    step_cond: bool = False  # few-step mode: condition on the step size d too (zero-init; see `fewstep`)


@dataclass
class FlowConfig:
    sides: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # r_k per stage, coarse first
    bounds: list[float] | None = None  # stage time boundaries t_0^1=0 < ... < t_1^K=1; None = equal
    sigma: float = 1.0  # stage-1 source std: x0 ~ N(0, sigma^2 I)
    gamma: float = 2.0  # diminish factor: sigma_k = gamma^-(k-1) * sigma for k > 1
    interpolant: str = "linear"  # "linear" | "trig" | "sbd" (Table 5)
    loss_weight: str = "pixel_sum"  # "pixel_sum": eq. 13 (sum over pixels, / d_K) | "sample_mean"
    predict: str = "velocity"  # net output: "velocity" b (eq. 13) | "data" x1-hat, turned into b
    alpha_min: float = 0.05  # predict=data: floor on alpha(tau) in 1/alpha, keeps tau -> 1 finite
    timesteps: int = 1000  # tau is embedded as tau * timesteps (Table 7 num.train.timesteps)
    # training tau within a stage: "uniform" (the paper) | "logit_normal" (SD3: tau = sigmoid(z),
    # z ~ N(tau_loc, tau_scale^2), more updates mid-stage); either way a stage gets its bounds' share
    tau_dist: str = "uniform"
    tau_loc: float = 0.0  # logit_normal: mean of z (> 0 favours tau near 1, the data end)
    tau_scale: float = 1.0  # logit_normal: std of z (> 0; large -> mass at both ends)
    # relative probability of drawing each stage's time window in training (one weight >= 0 per
    # side, e.g. [1, 1, 8] to train mostly a newly grown stage); None = by the bounds (the paper)
    stage_weights: list[float] | None = None


@dataclass
class DataConfig:
    # prepared shards: a folder (or its manifest.json), a folder URL (s3://bucket/prefix/,
    # https://host/prefix/, any fsspec scheme; manifest.json beside the shards), a brace pattern of
    # paths or URLs, or a pipe: command (runs a program: needs --allow-pipe / CDC_ALLOW_PIPE=1)
    shards: str = "data/ILSVRC2012-256"
    random_crop: bool = True  # block-aligned random crop of the expanded image (else centre)
    hflip: bool = True  # random horizontal flip (commutes with box downsampling)
    workers: int = 8  # dataloader worker processes per rank
    # equal spans each epoch is cut into, read by ranks x workers readers (cdc.data.plan); the
    # batch sequence depends on it and on the seed alone. 0 = ranks x workers of the run's first
    # start; a resume keeps the value it started with
    partitions: int = 0
    cache_dir: str = ""  # local folder for whole copies of remote (and pipe:) shards; "" = ranged reads
    cache_gb: float = 0.0  # size cap of cache_dir in GiB, least recently used evicted (0 = none)
    max_member_mb: int = 256  # a tar member larger than this (MiB) is refused unread
    shuffle: int = 2000  # unused since the sample-level plan (every partition is read in a permutation)
    mix_shards: int = 256  # unused since the sample-level plan (kept so older recipes load)
    cache_mb: int = 0  # unused since the sample-level plan (samples are read by offset; the OS caches)
    # a shard cut short or a sample that cannot be decoded: false = stop with one line naming the
    # shard and sample; true = replace it by its partition's next sample with a one-line warning
    # and count it (metrics: data_skipped)
    skip_bad: bool = False


@dataclass
class TrainConfig:
    batch_size: int = 8  # samples per GPU per micro-step (Table 7)
    grad_accum: int = 1  # micro-steps per optimizer step (derived from global_batch when that is set)
    global_batch: int = 0  # samples per optimizer step, all ranks: batch_size x grad_accum x world; 0 = off
    steps: int = 1_000_000  # optimizer steps (~200 ImageNet epochs at global batch 256)
    max_minutes: float = 0.0  # stop after this wall-clock budget (0 = no limit)
    lr: float = 1e-4  # AdamW learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear lr warm-up steps
    schedule: str = "constant"  # lr after warm-up: "constant" | "cosine" (to lr_min at `steps`)
    lr_min: float = 0.0  # final lr of the cosine schedule
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_decay: float = 0.9999  # EMA decay at steady state
    ema_warmup: bool = True  # decay = min(ema_decay, (1+n)/(10+n)) so short runs get a useful EMA
    # > 0: EDM2's power-function EMA instead of the two above: decay (1 - 1/(n+1))^(gamma+1) after
    # step n, i.e. weights ~ n^gamma, an average over a fixed share of the run whatever its length
    # (relative std sqrt((g+1) / ((g+2)^2 (g+3))): 0.16 for 3; the warm-up above acts like g ~ 8)
    ema_gamma: float = 0.0
    # post-hoc EMA (EDM2 Sec. 3; docs/posthoc-ema.md): steps between snapshots of power-function EMA
    # profiles written to RUN/ema-snapshots/, from which `cdc tune ema` rebuilds any EMA length
    # afterwards (0 = off; the train.ema_decay EMA above is kept either way)
    ema_snapshots: int = 0
    # relative std (sigma_rel, a share of the run's length) of each tracked profile; EDM2's pair
    ema_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    # snapshot file dtype: float16 | bfloat16 | float32 (the profiles themselves train in fp32)
    ema_snapshot_dtype: str = "float16"
    label_dropout: float = 0.1  # p of replacing the class by the null class (CFG training)
    precision: str = "bf16"  # "bf16" autocast on CUDA | "fp32"; CPU always runs fp32
    tf32: bool = True  # allow TF32 matmuls on Ampere+
    # torch.compile the packed trunk, once for every stage mix (torch >= 2.5; docs/performance.md):
    # true | false | "auto" (compile where this machine can: torch >= 2.5 and a C++ compiler on CPU
    # or triton on CUDA; eager otherwise, or if the first compile fails)
    compile: bool | str = False
    seed: int = 0  # base seed; every rank derives its own from (seed, rank)
    log_every: int = 100  # steps between metrics.jsonl lines
    ckpt_every: int = 5000  # steps between checkpoints (0 = only at the end and on signals)
    keep_last: int = 3  # rolling checkpoints kept
    # periodic checkpoints written in a background thread from a host copy, training going on
    # meanwhile (one in flight; the run's last save is waited for); false = the step waits
    async_save: bool = True
    milestone_every: int = 100_000  # steps between checkpoints that are never deleted (0 = none)
    sample_every: int = 10_000  # steps between EMA sample grids (0 = never)
    # evaluation during training (docs/posthoc-ema.md): every eval_every steps (0 = off) all ranks
    # sample eval_n images (image i with seed (sample.seed, i) and label i mod classes, by the
    # recipe's sampler without autoguidance) and metrics.jsonl gets SWD per level and the other
    # metrics below, with the seconds it cost
    eval_every: int = 0
    eval_n: int = 1000  # images per evaluation
    # weights evaluated: 0 = the train.ema_decay EMA; > 0 = the post-hoc EMA of this sigma_rel,
    # rebuilt from the snapshots so far (needs train.ema_snapshots)
    eval_sigma_rel: float = 0.0
    # reference .npz of `cdc score ref`: FID / IS / precision-recall where it holds Inception
    # statistics, SWD against its descriptors; "" = SWD against data.shards' images
    eval_ref: str = ""
    # also the Fashion-MNIST judge's accuracy and FD-clf (cdc/eval/fmnist.py; 32 px, 1 channel)
    eval_fmnist: bool = False
    max_nonfinite: int = 20  # consecutive non-finite steps before the run stops
    check_every: int = 10  # steps between host reads of stop signals / skipped steps (each waits for the GPU)
    # dense bf16 matmul peak (TFLOP/s) that metrics.jsonl's MFU divides by: DESIGN.md's H100
    # figure, not measured by this project; `bin/gpu-check` measures the peak of the GPU it runs on
    peak_tflops: float = 800.0
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    init: str = ""  # checkpoint file, run dir or export folder whose EMA weights start a fresh run; "" = random
    # with train.init: learning-rate multiplier of the transformer blocks that came from the init
    # (the shared trunk); 0 freezes them, 1 trains them like the rest (grow a stage: docs/grow.md)
    init_trunk_lr: float = 1.0
    # where metrics, preview grids and the config go: jsonl (metrics.jsonl, always written) plus
    # tensorboard (RUN/tensorboard) and/or wandb; pip install 'cdc[tensorboard]' / 'cdc[wandb]'
    log: list[str] = field(default_factory=lambda: ["jsonl"])


@dataclass
class SampleConfig:
    steps: list[int] = field(default_factory=lambda: [24])  # model evals per stage (one or per stage)
    cfg: list[float] = field(default_factory=lambda: [3.0])  # CFG scale S_cfg (eq. 77): one for every stage, or one per stage
    solver: str = "euler"  # "euler" (Alg. 2/4) | "heun" | "sde" (App. D, linear interpolant)
    interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # apply CFG for tau in [lo, hi)
    # autoguidance: a weaker checkpoint of the same model to guide away from (a file, a run dir, or
    # "step:N" = the sampled run's own checkpoint at step N, e.g. a train.milestone_every one); "" = off.
    # Used by `cdc sample` and `cdc ablate`; the preview grids written during training do not autoguide.
    guide: str = ""
    guide_scale: list[float] = field(default_factory=lambda: [1.0])  # its weight w, one or per stage; 1 = off
    sde_eps: float = 1.0  # SDE diffusion scale (solver "sde")
    seed: int = 0  # image i uses noise from seed (seed, i)
    batch: int = 32  # images per forward
    # CUDA only: stages whose side is at most this (px) replay the model's forward from CUDA graphs
    # (cdc.nn.cuda_graphs; short sequences are likely launch-bound); 0 = off. Ignored on CPU.
    cuda_graph_side: int = 0


@dataclass
class FewStepConfig:
    # the shortcut objective (cdc.flow.shortcut), used when model.step_cond is true; docs/few-step.md
    fraction: float = 0.25  # share of each stage group trained for self-consistency (rest: d = 0)
    levels: int = 3  # step sizes d = 2^-j, j = 0..levels, as fractions of a stage (1 ... 1/8)
    teacher: str = "none"  # d = 0 targets: "none" data (x1 - x0) | "init" the frozen train.init EMA
    # teacher=init: the guidance baked into the teacher's targets, as `sample` has it: CFG scale
    # (one, or one per stage; 1 = unguided) and autoguidance of the teacher by `guide` (a file, a
    # run dir, or "step:N" = the teacher run's own step N; "" = off) with weight guide_scale
    cfg: list[float] = field(default_factory=lambda: [1.0])
    guide: str = ""
    guide_scale: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fewstep: FewStepConfig = field(default_factory=FewStepConfig)


# ---------------------------------------------------------------------------------------------
# loading, validation, dumping


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce `value` to the annotated type `tp` or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_type(key, value, inner[0])
        for tp_i in inner:  # e.g. `bool | str`: the first type the value fits wins
            try:
                return _check_type(key, value, tp_i)
            except ConfigError:
                pass
        names = " or ".join("true/false" if a is bool else a.__name__ for a in inner)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner is not str:
            value = [value]  # `steps: 24` means the same count at every stage
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _apply(section_obj: Any, section: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{section}.{key}'; valid keys: {', '.join(names)}")
        setattr(section_obj, key, _check_type(f"{section}.{key}", value, hints[key]))


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"bad override '{text}': use section.key=value, e.g. train.lr=3e-4")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.split(".", 1)
    try:
        return section.strip(), key.strip(), yaml.safe_load(rhs) if rhs.strip() else ""
    except yaml.YAMLError as e:  # e.g. `train.lr=[1`: the value, not the whole command, is wrong
        raise ConfigError(f"--set {lhs}: {rhs!r} is not a YAML value ({str(e).splitlines()[0]})") from None


def from_dict(raw: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from nested dicts (recipe) plus `section.key=value` overrides."""
    raw = dict(raw or {})
    sections = [f.name for f in dataclasses.fields(Config)]
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in sections:
            raise ConfigError(f"--set {text}: unknown section '{section}'; valid sections: {', '.join(sections)}")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        raw[section] = {**raw[section], key: value}
    cfg = Config()
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown section '{section}'; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping of key: value")
        values = dict(values)
        if section == "model" and "preset" in values:
            preset = values["preset"]
            if not isinstance(preset, str) or preset not in PRESETS:  # a list or mapping is unhashable
                raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {list(PRESETS)}")
            # the preset sets the size; keys given explicitly in the same section still win
            values = {**PRESETS[preset], **values}
        _apply(getattr(cfg, section), section, values)
    validate(cfg)
    return cfg


def for_world(cfg: Config, world: int) -> Config:
    """A copy of cfg whose train.grad_accum makes batch_size x grad_accum x world = train.global_batch.

    With global_batch 0 (off) the copy is unchanged. The paper's global batch 256 is 8 per GPU on
    32 GPUs; on 8 GPUs the same optimisation needs 4 micro-steps per optimizer step.
    """
    out = copy.deepcopy(cfg)
    t = out.train
    if t.global_batch:
        per_step = t.batch_size * world
        if t.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={t.global_batch} is not a multiple of train.batch_size "
                f"({t.batch_size}) x {world} processes = {per_step}; change the process count, "
                f"train.batch_size or train.global_batch"
            )
        t.grad_accum = t.global_batch // per_step
    return out


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML recipe (None = all defaults) and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}; pass a YAML file such as recipes/quickstart.yaml")
        try:
            raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not valid YAML (not UTF-8 text); pass a recipe such as recipes/quickstart.yaml") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{p}: a recipe must be a mapping of sections (model, flow, data, train, sample)"
            )
    try:
        return from_dict(raw, overrides)
    except ConfigError as e:
        # name the recipe, unless the message is about a --set value (it starts with that key)
        keys = tuple(o.split("=", 1)[0].strip() for o in overrides)
        msg = str(e)
        ours = ("bad override", "--set ", *keys, *(f"unknown key '{k}'" for k in keys))
        if path is None or msg.startswith(ours):
            raise
        raise ConfigError(f"{path}: {msg}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
