"""Reading a folder written by `cdc export`: model.safetensors + config.json + SHA256SUMS (+ a
model card, + guide/, the autoguidance model as an export of its own).

Loading never executes code: the weights are safetensors (a JSON header and raw tensor bytes) and
the config is JSON. SHA256SUMS (`sha256sum -c` format) records the sha256 of config.json, of
model.safetensors and of guide/SHA256SUMS, so a changed config, a tampered or truncated weights
file, or another guide is refused (safetensors itself has no checksum, and flipped bytes would load
as other weights); the model card is not covered, so it may be edited. Every failure is one
BadFileError line naming the file (exit 2 through the CLI). A cdc-export/1 folder (no SHA256SUMS)
still loads, its weights checked against the sha256 its config.json records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from cdc.fileio import BadFileError, bad_file, display, one_line, read_json_object

FORMAT = "cdc-export/2"
FORMATS = ("cdc-export/1", FORMAT)  # what this version reads
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
SUMS = "SHA256SUMS"
GUIDE = "guide"  # subfolder holding the bundled autoguidance model; also its sample.guide entry
# config.json's keys beside the resolved config's sections (model, flow, data, train, sample, fewstep)
EXTRA_KEYS = ("format", "step", "cdc_version", "export")
EXPECTED = f"a cdc export's {CONFIG} (written by `cdc export`)"
EXPECTED_SUMS = f"a cdc export's {SUMS} (lines of 'sha256  file', written by `cdc export`)"


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


def write_sums(folder: Path, names: list[str]) -> None:
    """SHA256SUMS over `names` (paths relative to `folder`), readable by `sha256sum -c`."""
    (folder / SUMS).write_text("".join(f"{sha256_of(folder / n)}  {n}\n" for n in names))


def read_sums(folder: Path) -> dict[str, str]:
    """{relative path: sha256} from the folder's SHA256SUMS; it must cover the config and weights."""
    path = folder / SUMS
    if not path.is_file():
        raise FileNotFoundError(f"{display(path)} not found: an export needs it beside {CONFIG}; export again")
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad_file(path, EXPECTED_SUMS, f"the line {line[:80]!r} is not 'sha256  relative/path'")
        sums[name] = digest
    if missing := [n for n in (CONFIG, WEIGHTS) if n not in sums]:
        raise bad_file(path, EXPECTED_SUMS, f"it does not list {', '.join(missing)}")
    return sums


def verify(folder: Path, raw: dict[str, Any]) -> None:
    """Every file the export's hashes cover is the one exported (one line naming the first that is not)."""
    if raw["format"] == "cdc-export/1":  # no SHA256SUMS yet: only the weights were hashed
        sums = {WEIGHTS: raw["export"]["sha256"]}
    else:
        sums = read_sums(folder)
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise FileNotFoundError(f"{display(f)} not found: the export lists it in {SUMS}; restore it or export again")
        if sha256_of(f) != digest:
            where = SUMS if raw["format"] == FORMAT else CONFIG
            raise BadFileError(
                f"{display(f)}: its sha256 differs from {where}'s: changed or truncated after export; "
                "restore it or export again"
            )


def read_config(folder: Path) -> dict[str, Any]:
    """config.json checked for the export format, the step and the weights' record."""
    path = folder / CONFIG
    raw = read_json_object(path, EXPECTED)
    if raw.get("format") not in FORMATS:
        raise bad_file(path, EXPECTED, f"its format is {raw.get('format')!r}, not one of {', '.join(FORMATS)}")
    meta = raw.get("export")
    step = raw.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad_file(path, EXPECTED, f"its step is {step!r}, not a count >= 0")
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or meta.get("weights") not in ("ema", "model"):
        raise bad_file(path, EXPECTED, "no export entry with the weights' sha256 and kind")
    return raw


def read_export(folder: str | Path):
    """(weights, Config, config.json's content) of an exported folder, every hashed file verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cdc.config import ConfigError, from_dict

    folder = folder_of(folder)
    raw = read_config(folder)
    verify(folder, raw)
    try:
        cfg = from_dict({k: v for k, v in raw.items() if k not in EXTRA_KEYS})
    except ConfigError as e:
        raise bad_file(folder / CONFIG, EXPECTED, f"its config is invalid: {one_line(e)}") from None
    wpath = folder / WEIGHTS
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise bad_file(wpath, f"the weights {CONFIG} records (safetensors written by `cdc export`)", e) from None
    return state, cfg, raw


def own_guide(spec: str, weights: Path) -> Path | None:
    """The weights of the guide an export bundles, when `spec` (its sample.guide) names it; else None.
    The bundled guide is named relative to the export, so the folder samples wherever it is copied."""
    folder = weights.parent
    if spec != GUIDE or weights.name != WEIGHTS or not is_export(folder):
        return None
    return folder / GUIDE / WEIGHTS


def load_export(folder: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, Config, info) from an exported folder, as checkpoint.load_for_inference."""
    from cdc.nn.model import build_model

    folder = folder_of(folder)
    raw = read_config(folder)
    if not ema and raw["export"]["weights"] == "ema":
        raise ValueError(f"{display(folder)} is an export holding only EMA weights; drop --no-ema (ema=False)")
    state, cfg, raw = read_export(folder)
    wpath = folder / WEIGHTS
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise BadFileError(
            f"{display(wpath)}: its weights do not fit the network {CONFIG} describes ({one_line(e)})"
        ) from None
    model.to(device).eval().requires_grad_(False)
    info = {"path": str(wpath), "step": int(raw["step"]), "weights": raw["export"]["weights"], "export": True}
    return model, cfg, info
