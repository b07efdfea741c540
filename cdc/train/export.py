"""`cdc export`: a run's EMA weights as a folder to share: model.safetensors, config.json,
SHA256SUMS, README.md, and guide/ when the run autoguides with another checkpoint.

The guide (sample.guide: a file, a run dir or the run's own step:N) is bundled as an export of its
own under guide/, named relative to the folder, so the export samples as the run does on any
machine; a guide that cannot be read here is dropped with a one-line note (the folder then samples
with CFG alone). SHA256SUMS covers config.json, the weights and guide/SHA256SUMS (cdc.train.exported).

The folder is written under a hidden temp name beside `out` and renamed into place once complete,
so `out` is never a half-written export; a previous export there is replaced only with overwrite.
The reader is cdc.train.exported (sampling, scoring and cdc.load accept the folder like a run).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from cdc import __version__
from cdc.config import Config, from_dict, to_dict
from cdc.fileio import BadFileError, _fsync_dir, check_out_path, display, one_line, read_json_object
from cdc.redact import redact, redact_obj
from cdc.train import checkpoint as ckpt_lib
from cdc.train.exported import (
    CARD,
    CONFIG,
    FORMAT,
    FORMATS,
    GUIDE,
    SUMS,
    WEIGHTS,
    is_export,
    sha256_of,
    write_sums,
)
from cdc.train.run_files import read_metrics

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export(src: str | Path, out: str | Path, dtype: str = "fp32", overwrite: bool = False) -> dict[str, Any]:
    """Export `src` (run dir or checkpoint file) to the folder `out`; returns config.json's content.

    dtype: "fp32" keeps the weights as trained (samples equal the checkpoint's bit for bit);
    "bf16" halves the file (samples then differ slightly). Only floating tensors are cast.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected bf16 or fp32, got {dtype!r}")
    out = Path(out)
    check_out_path(out, "--out")
    _check_target(out, overwrite)
    path = ckpt_lib.resolve(src)
    if is_export(path):
        raise ValueError(f"{display(src)} is already an export; copy the folder, or export the run it came from")
    state = ckpt_lib.load(path)
    with ckpt_lib.reading(path):  # the stored config is the file's content too
        cfg = from_dict(state["config"])
    key = "ema" if state.get("ema") is not None else "model"
    tensors = _cast(state[key], dtype)
    meta = _meta(cfg, int(state.get("step", 0)), key, dtype, path)
    guide = _bundle_guide(cfg.sample.guide, path, dtype)
    if isinstance(guide, str):  # not bundled: the reason
        meta["sample"]["guide"], meta["sample"]["guide_scale"] = "", [1.0]
        meta["export"]["guide_dropped"] = cfg.sample.guide
        print(f"note: {guide}; the export samples with CFG alone unless given --guide", file=sys.stderr)
        guide = None
    elif guide is not None:
        meta["sample"]["guide"] = GUIDE
        meta["export"]["guide"] = {"source": guide[1]["export"]["source"], "step": guide[1]["step"]}
    # a shared folder: no credentials from a shard URL (an older checkpoint stored its config raw)
    meta = redact_obj(meta)
    card = redact(model_card(cfg, meta, _run_dir(path), tensors))
    _write_folder(out, tensors, meta, card, guide)
    return meta


def _cast(weights: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Contiguous copies in `dtype`; only floating tensors are cast."""
    return {
        k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in weights.items()
    }


def _meta(cfg: Config, step: int, key: str, dtype: str, source: Path) -> dict[str, Any]:
    """config.json's content: the resolved config and the export's record (sha256 filled on write)."""
    return {
        **to_dict(cfg),
        "format": FORMAT,
        "step": step,
        "cdc_version": __version__,
        "export": {"weights": key, "dtype": dtype, "source": str(source.resolve()), "sha256": ""},
    }


def _bundle_guide(spec: str, ckpt: Path, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | str | None:
    """(weights, config.json content) of the run's autoguidance model, to go under guide/; the
    reason as a string when it cannot be read here; None when the run does not autoguide."""
    if not spec:
        return None
    try:
        gpath = ckpt_lib.guide_path(spec, ckpt, key="sample.guide")
        gmodel, gcfg, info = ckpt_lib.load_for_inference(gpath, ema=True)
    except (OSError, BadFileError) as e:
        return f"the run's autoguide (sample.guide {spec}) is not exported: {one_line(e)}"
    meta = _meta(gcfg, info["step"], info["weights"], dtype, Path(info["path"]))
    meta["sample"]["guide"], meta["sample"]["guide_scale"] = "", [1.0]  # a guide is not guided itself
    return _cast(gmodel.state_dict(), dtype), redact_obj(meta)


def _check_target(out: Path, overwrite: bool) -> None:
    """`out` may be missing or empty; a previous export is replaced only with overwrite; anything
    else is refused (export never deletes a folder it did not write)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / CONFIG).is_file() or _format(out / CONFIG) not in FORMATS:
        raise ValueError(f"--out {display(out)} is a non-empty folder that is not an export; choose another --out")
    if not overwrite:
        raise ValueError(f"--out {display(out)} holds an export already; pass --overwrite to replace it")


def _format(path: Path) -> Any:
    try:
        return read_json_object(path, "an export's config.json").get("format")
    except (ValueError, OSError):
        return None


def _run_dir(path: Path) -> Path | None:
    """The run directory of checkpoint `path` (run/checkpoints/step_N.pt), if it is laid out so."""
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _write_folder(
    out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], card: str,
    guide: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
) -> None:  # fmt: skip
    """Fill a temp folder beside `out`, then rename it into place (the old export, if any, is set
    aside first and deleted last): `out` holds the old export or the new one, never a mix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    old = out.with_name(f".{out.name}.old.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if guide is not None:
            (tmp / GUIDE).mkdir()
            _write_files(tmp / GUIDE, *guide, card=None, covers=[])
        _write_files(tmp, tensors, meta, card, covers=[f"{GUIDE}/{SUMS}"] if guide is not None else [])
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_files(
    folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], card: str | None, covers: list[str]
) -> None:
    """The weights, config.json (recording the weights' sha256), the card and SHA256SUMS over the
    weights, config.json and `covers`, each fsynced."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    meta["export"]["sha256"] = sha256_of(folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    names = [WEIGHTS, CONFIG]
    if card is not None:
        (folder / CARD).write_text(card)
    write_sums(folder, names + covers)
    for name in names + [SUMS] + ([CARD] if card is not None else []):
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _params(cfg: Config) -> int:
    """The network's parameter count, built on the meta device (no memory, no init)."""
    from cdc.nn.model import build_model, count_params

    with torch.device("meta"):
        return count_params(build_model(cfg))


def _data_line(cfg: Config) -> str:
    """The training data: shard folder, and the source its manifest names when it is here."""
    line = f"`{cfg.data.shards}`"
    manifest = Path(cfg.data.shards) / "manifest.json"
    try:
        m = read_json_object(manifest, "a cdc prepare manifest")
    except (ValueError, OSError):
        return line + " (its manifest is not on this machine)"
    return line + f", prepared from {m.get('source')} ({m.get('count')} images, {m.get('num_classes')} classes)"


def _metrics_lines(run: Path | None, step: int) -> list[str]:
    """Final training metrics from the run's metrics.jsonl (the last line at or before `step`)."""
    f = run / "metrics.jsonl" if run is not None else None
    if f is None or not f.is_file():
        return ["- final metrics: unknown (no metrics.jsonl beside the checkpoint)"]
    try:
        lines = [x for x in read_metrics(f) if isinstance(x.get("step"), int) and x["step"] <= step]
    except ValueError:
        return [f"- final metrics: unknown ({display(f)} does not read)"]
    if not lines:
        return ["- final metrics: none logged"]
    last = lines[-1]
    stages = last.get("loss_stage")
    per = f" (per stage: {', '.join(f'{v:.4f}' for v in stages.values())})" if isinstance(stages, dict) else ""
    out = [f"- final loss at step {last['step']}: {last.get('loss', float('nan')):.4f}{per}"]
    if last.get("global_batch"):
        out.append(f"- global batch: {last['global_batch']}")
    return out


def model_card(cfg: Config, meta: dict[str, Any], run: Path | None, tensors: dict[str, torch.Tensor]) -> str:
    """README.md of the export: what the model is, how it was trained, how to sample it."""
    m, fl, t, s = cfg.model, cfg.flow, cfg.train, meta["sample"]
    ex = meta["export"]
    params = _params(cfg)
    lines = [
        f"# CDC-FM model (step {meta['step']})",
        "",
        "A class-conditional CDC-FM model: coarse-to-fine pixel-space flow matching with conditional",
        f"dependent coupling, K = {len(fl.sides)} stages at sides {', '.join(map(str, fl.sides))} px, "
        f"{m.in_channels} channel(s), {m.num_classes} classes.",
        f"DiT of depth {m.depth}, width {m.width}, {m.heads} heads, patch {m.patch}: {params:,} parameters"
        + (" (one DiT per stage)" if m.stage_models else "") + ".",
        f"Weights: the run's {ex['weights'].upper()} weights in {ex['dtype']} (`{WEIGHTS}`); the full "
        f"resolved config in `{CONFIG}`. Exported by cdc {__version__} from `{ex['source']}`.",
        "",
        "## Training",
        f"- data: {_data_line(cfg)}",
        f"- steps: {meta['step']} of {t.steps} planned; lr {t.lr}, EMA decay {t.ema_decay}",
        f"- batch: {t.batch_size} per GPU x {t.grad_accum} accumulation"
        + (f" (global_batch {t.global_batch})" if t.global_batch else ""),
        *_metrics_lines(run, meta["step"]),
        "",
        "## Sampling",
        f"Stored sampler defaults: {s['solver']}, steps {s['steps']}, cfg {s['cfg']}, seed {s['seed']}.",
    ]
    if ex.get("guide_dropped"):
        lines.append(
            f"The run autoguided with {ex['guide_dropped']}, which could not be read at export and is not "
            "exported; this folder samples with CFG alone unless given --guide."
        )
    if ex.get("guide"):
        lines.append(
            f"Autoguidance with weight {s['guide_scale']} by the run's guide (step {ex['guide']['step']} of "
            f"`{ex['guide']['source']}`), bundled in `{GUIDE}/`; `--guide none` samples with CFG alone."
        )
    lines += [
        "",
        "```",
        "cdc sample --ckpt DIR -n 16",
        "```",
        "",
        "```python",
        "from cdc import load",
        'g = load("DIR")  # device="cuda", dtype="bf16" also work',
        "images = g.sample(classes=[0, 1], n=8, seed=0)  # uint8 (N, C, H, W)",
        'g.to_pil(images)[0].save("first.png")',
        "```",
        "",
        "DIR is this folder. Loading reads only safetensors and JSON (no pickle, no code), and checks",
        f"every file `{SUMS}` lists (`sha256sum -c {SUMS}` checks them by hand).",
        "",
    ]
    return "\n".join(lines)
