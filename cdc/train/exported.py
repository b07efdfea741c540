"""Reading a folder written by `cdc export`: model.safetensors + config.json (+ a model card).

Loading never executes code: the weights are safetensors (a JSON header and raw tensor bytes) and
the config is JSON. config.json records the sha256 of model.safetensors, so a tampered or truncated
weights file is refused (safetensors itself has no checksum, and flipped bytes would load as other
weights). Every failure is one BadFileError line naming the file (exit 2 through the CLI).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from cdc.fileio import BadFileError, bad_file, display, one_line, read_json_object

FORMAT = "cdc-export/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
# config.json's keys beside the resolved config's sections (model, flow, data, train, sample, fewstep)
EXTRA_KEYS = ("format", "step", "cdc_version", "export")
EXPECTED = f"a cdc export's {CONFIG} (written by `cdc export`)"


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_export(path: str | Path) -> bool:
    """Whether `path` is an exported folder, or the model.safetensors inside one."""
    p = Path(path)
    folder = p.parent if p.name == WEIGHTS and p.is_file() else p
    return folder.is_dir() and (folder / CONFIG).is_file() and not (folder / "checkpoints").is_dir()


def folder_of(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.name == WEIGHTS and p.is_file() else p


def read_config(folder: Path) -> dict[str, Any]:
    """config.json checked for the export format, the step and the weights' record."""
    path = folder / CONFIG
    raw = read_json_object(path, EXPECTED)
    if raw.get("format") != FORMAT:
        raise bad_file(path, EXPECTED, f"its format is {raw.get('format')!r}, not {FORMAT!r}")
    meta = raw.get("export")
    step = raw.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad_file(path, EXPECTED, f"its step is {step!r}, not a count >= 0")
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or meta.get("weights") not in ("ema", "model"):
        raise bad_file(path, EXPECTED, "no export entry with the weights' sha256 and kind")
    return raw


def load_export(folder: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, Config, info) from an exported folder, as checkpoint.load_for_inference."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cdc.config import ConfigError, from_dict
    from cdc.nn.model import build_model

    folder = folder_of(folder)
    raw = read_config(folder)
    meta = raw["export"]
    if not ema and meta["weights"] == "ema":
        raise ValueError(f"{display(folder)} is an export holding only EMA weights; drop --no-ema (ema=False)")
    try:
        cfg = from_dict({k: v for k, v in raw.items() if k not in EXTRA_KEYS})
    except ConfigError as e:
        raise bad_file(folder / CONFIG, EXPECTED, f"its config is invalid: {one_line(e)}") from None
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"{display(wpath)} not found: an export needs its weights beside {CONFIG}")
    expected = f"the weights {CONFIG} records (safetensors written by `cdc export`)"
    if sha256_of(wpath) != meta["sha256"]:
        raise bad_file(wpath, expected, f"its sha256 differs from {CONFIG}'s: changed or truncated after export")
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise bad_file(wpath, expected, e) from None
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise BadFileError(
            f"{display(wpath)}: its weights do not fit the network {CONFIG} describes ({one_line(e)})"
        ) from None
    model.to(device).eval().requires_grad_(False)
    info = {"path": str(wpath), "step": int(raw["step"]), "weights": meta["weights"], "export": True}
    return model, cfg, info
