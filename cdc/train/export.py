"""`cdc export`: a run's EMA weights as a folder to share: model.safetensors, config.json, README.md.

The folder is written under a hidden temp name beside `out` and renamed into place once complete,
so `out` is never a half-written export; a previous export there is replaced only with overwrite.
The reader is cdc.train.exported (sampling, scoring and cdc.load accept the folder like a run).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cdc import __version__
from cdc.config import Config, from_dict, to_dict
from cdc.fileio import _fsync_dir, check_out_path, display, read_json_object
from cdc.redact import redact, redact_obj
from cdc.train import checkpoint as ckpt_lib
from cdc.train.exported import CARD, CONFIG, FORMAT, WEIGHTS, is_export, sha256_of
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
    tensors = {
        k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).detach().contiguous().clone()
        for k, v in state[key].items()
    }
    meta = {
        **to_dict(cfg),
        "format": FORMAT,
        "step": int(state.get("step", 0)),
        "cdc_version": __version__,
        "export": {"weights": key, "dtype": dtype, "source": str(path.resolve()), "sha256": ""},
    }
    guide = cfg.sample.guide
    if guide.startswith("step:"):  # the run's own step-N checkpoint is not part of the export
        meta["sample"]["guide"], meta["sample"]["guide_scale"] = "", [1.0]
        meta["export"]["guide_dropped"] = guide
    # a shared folder: no credentials from a shard URL (an older checkpoint stored its config raw)
    meta = redact_obj(meta)
    card = redact(model_card(cfg, meta, _run_dir(path), tensors))
    _write_folder(out, tensors, meta, card)
    return meta


def _check_target(out: Path, overwrite: bool) -> None:
    """`out` may be missing or empty; a previous export is replaced only with overwrite; anything
    else is refused (export never deletes a folder it did not write)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / CONFIG).is_file() or _format(out / CONFIG) != FORMAT:
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


def _write_folder(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], card: str) -> None:
    """Fill a temp folder beside `out`, then rename it into place (the old export, if any, is set
    aside first and deleted last): `out` holds the old export or the new one, never a mix."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    old = out.with_name(f".{out.name}.old.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta["export"]["sha256"] = sha256_of(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / CARD).write_text(card)
        for name in (WEIGHTS, CONFIG, CARD):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
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
            f"The run autoguided with its own checkpoint ({ex['guide_dropped']}), which is not exported; "
            "this folder samples with CFG alone unless given --guide."
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
        "DIR is this folder. Loading reads only safetensors and JSON (no pickle, no code).",
        "",
    ]
    return "\n".join(lines)
