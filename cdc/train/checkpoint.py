"""Atomic checkpoints that never execute code when opened, with fallback past a corrupt newest one.

Layout of a run directory:
    config.yaml            resolved config of the run
    metrics.jsonl          one JSON object per logged step
    checkpoints/step_0001000.pt (+ .sha256)   rolling and milestone checkpoints
    samples/               periodic EMA sample grids

A checkpoint is valid only when its `.sha256` sidecar exists and matches: the sidecar is written
after the data file has been fsynced and renamed into place, so a crash at any point leaves either
the previous good checkpoint or a complete new one. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cdc.fileio import (  # noqa: F401 (re-exported)
    BadFileError,
    _fsync_dir,
    atomic_write_bytes,
    bad_file,
    cleaned_on_failure,
    display,
    one_line,
    temp_name,
    warn,
)
from cdc.train import exported

CKPT_RE = re.compile(r"^step_(\d{7,})\.pt$")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in `obj` (nested dicts, lists): about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save(path: Path, state: dict[str, Any]) -> Path:
    """Save `state` (tensors, dicts, lists, numbers, strings only) atomically with a sha256 sidecar.
    Its `config` is stored redacted (cdc.redact): a checkpoint is shared, a shard URL's credentials
    are not (nothing reads data.* back from a checkpoint: a resume takes them from the recipe)."""
    from cdc.redact import redact_obj

    path = Path(path)
    if isinstance(state.get("config"), dict):
        state = {**state, "config": redact_obj(state["config"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".sha256")
    # a full disk: the temp file goes, the previous checkpoints stay, one line names the folder
    with cleaned_on_failure(path, temp_name(path), "checkpoint", _nbytes(state)) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        if sidecar.exists():  # an older file of the same name is about to be replaced: invalidate first
            sidecar.unlink()
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    try:
        atomic_write_bytes(sidecar, f"{digest}  {path.name}\n".encode(), "checkpoint sidecar")
    except BaseException:
        path.unlink(missing_ok=True)  # unverifiable without its sidecar: resume would only skip it
        raise
    return path


def verify(path: Path) -> bool:
    """True when the checkpoint's sidecar exists and its sha256 matches the file."""
    sidecar = Path(path).with_name(Path(path).name + ".sha256")
    if not Path(path).is_file() or not sidecar.is_file():
        return False
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    return expected == sha256_file(Path(path))


EXPECTED = "a cdc checkpoint (a .pt file written by `cdc train`)"
INFERENCE_KEYS = ("config", "model")  # what sampling and --init read
RESUME_KEYS = ("config", "model", "ema", "optimizer", "step")  # what a resumed run restores


class BadCheckpointError(BadFileError, pickle.UnpicklingError):
    """A checkpoint file that cannot be loaded safely; still an UnpicklingError for old callers."""


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """The one guard around every checkpoint read (--ckpt, --init, --guide, resume).

    Whatever fails inside it (bytes torch cannot parse, a torch file that is not a cdc checkpoint,
    missing entries, wrong types, a stored config or weights that do not fit) leaves as a one-line
    BadCheckpointError naming the file and what was expected; the original stays its __cause__.
    Errors that already name the file (BadCheckpointError) pass through unchanged.
    """
    try:
        yield
    except BadCheckpointError:
        raise
    except Exception as e:  # readers of hostile bytes raise anything: KeyError, IndexError, OSError, ...
        raise BadCheckpointError(f"{display(path)}: not {EXPECTED} ({_reason(e)})") from e


def _reason(e: BaseException, limit: int = 160) -> str:
    """The gist of a load failure in a few words: torch's messages run to paragraphs (and advise
    turning the safe unpickler off, which would run the file's code), and KeyError's is a bare key."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # refused by the code-free unpickler; the detail follows
        detail = text.split("WeightsUnpickler error:", 1)[1].strip()
        why = f"the safe unpickler (weights_only) refused it: {one_line(detail)}"
    elif "PytorchStreamReader " in text:  # a zip that torch cannot read: "failed reading zip archive: ..."
        why = f"damaged or truncated: {text.split('PytorchStreamReader ', 1)[1].split('. ')[0]}"
    else:
        msg = one_line(e)
        why = msg if msg == type(e).__name__ else f"{type(e).__name__}: {msg}"
    return why if len(why) <= limit else why[: limit - 3] + "..."


def _bad(path: str | os.PathLike, why: str) -> BadCheckpointError:
    return BadCheckpointError(f"{display(path)}: not {EXPECTED} ({why})")


def _is_weights(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def check_state(state: Any, path: str | os.PathLike, need: tuple[str, ...] = INFERENCE_KEYS) -> dict[str, Any]:
    """`state` if it has the entries `need` names and the types cdc writes; else a BadCheckpointError."""
    if not isinstance(state, dict):
        raise _bad(path, f"holds a {type(state).__name__}, not a dict")
    missing = [k for k in need if k not in state]
    if missing:
        raise _bad(path, f"no {'/'.join(missing)} entr{'y' if len(missing) == 1 else 'ies'}")
    for key in ("model", "ema"):
        if state.get(key) is not None and not _is_weights(state[key]):
            raise _bad(path, f"its {key} entry is not a state dict of tensors")
    if "config" in state and not isinstance(state["config"], dict):
        raise _bad(path, "its config entry is not a mapping")
    step = state.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _bad(path, f"its step entry is {step!r}, not a count >= 0")
    if "optimizer" in need and not isinstance(state["optimizer"], dict):
        raise _bad(path, "its optimizer entry is not a mapping")
    return state


def load(
    path: Path, map_location: str | torch.device = "cpu", need: tuple[str, ...] = INFERENCE_KEYS,
    mmap: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint onto `map_location` (CPU by default) without executing any code.

    `weights_only=True`: a pickle that would call code (or anything but tensors and containers) is
    refused. Any file that does not load, or lacks the entries `need` names, is a one-line
    BadCheckpointError (an UnpicklingError); a file that cannot be opened keeps its OSError.
    mmap: tensors stay views of the file's pages (shared by every process on the node through the
    page cache) until copied into a model, instead of a private copy per process.
    """
    with open(path, "rb") as f, reading(path):  # missing / unreadable: the OSError names the file
        with warnings.catch_warnings():  # torch warns (with a source line) about odd pickle protocols
            warnings.simplefilter("ignore")
            src = str(path) if mmap else f  # torch maps a file by name
            state = torch.load(src, map_location=map_location, weights_only=True, mmap=mmap)
        return check_state(state, path, need)


def ckpt_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `ckpt_dir`, newest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def _skip_unverified(path: Path, then: str) -> None:
    """One `warning:` line (not Python's warning format with its source line) for a skipped file."""
    sidecar = path.with_name(path.name + ".sha256")
    why = "sha256 does not match its .sha256 sidecar" if sidecar.is_file() else "no .sha256 sidecar"
    warn(f"{display(path)} is incomplete or corrupt ({why}); skipped, {then}")


def load_latest(
    ckpt_dir: Path, map_location: str | torch.device = "cpu", need: tuple[str, ...] = INFERENCE_KEYS,
    mmap: bool = False,
) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies and loads (with the entries `need` names); warns about
    and skips corrupt newer ones."""
    for _, path in list_checkpoints(ckpt_dir):
        if not verify(path):
            _skip_unverified(path, "trying an older one")
            continue
        try:
            return load(path, map_location, need, mmap), path
        except (BadCheckpointError, OSError) as e:  # a verified file that still does not load
            warn(f"{one_line(e)}; skipped, trying an older one")
    return None


def set_aside_newer(ckpt_dir: Path, step: int) -> list[Path]:
    """Rename every checkpoint newer than `step` (those `load_latest` skipped as corrupt) and its
    sidecar to `*.corrupt[.N]`, and return the new names.

    A run resumed from an older step writes checkpoints below the corrupt one; `prune` keeps the
    newest steps, so left in place the corrupt file would outrank, and get the new ones deleted.
    Renamed, not deleted: its bytes stay for inspection.
    """
    moved = []
    for s, p in list_checkpoints(ckpt_dir):
        if s <= step:
            continue
        for f in (p.with_name(p.name + ".sha256"), p):  # sidecar first, as in prune
            if f.exists():
                dst, n = f.with_name(f.name + ".corrupt"), 1
                while dst.exists():
                    dst, n = f.with_name(f"{f.name}.corrupt.{n}"), n + 1
                os.replace(f, dst)
                if f == p:
                    moved.append(dst)
    return moved


def prune(ckpt_dir: Path, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete rolling checkpoints beyond the newest `keep_last`; milestones are kept forever."""
    removed = []
    rolling = [
        (s, p) for s, p in list_checkpoints(ckpt_dir) if not (milestone_every and s % milestone_every == 0)
    ]
    for _, p in rolling[max(keep_last, 1) :]:
        for f in (p.with_name(p.name + ".sha256"), p):  # sidecar first: a half-deleted pair is invalid
            f.unlink(missing_ok=True)
        removed.append(p)
    return removed


def resolve(ckpt: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """A checkpoint file from a file path, a run directory, or None (= newest run under runs_dir)."""
    if ckpt is None:
        runs = Path(runs_dir)
        cands = [d for d in runs.iterdir() if (d / "checkpoints").is_dir()] if runs.is_dir() else []
        cands = [d for d in cands if list_checkpoints(d / "checkpoints")]
        if not cands:
            raise FileNotFoundError(
                f"no run with checkpoints under {runs}/; train one or pass --ckpt RUN_DIR|FILE"
            )
        ckpt = max(cands, key=lambda d: list_checkpoints(d / "checkpoints")[0][1].stat().st_mtime)
    p = Path(ckpt)
    if exported.is_export(p):  # a `cdc export` folder: its weights file stands for it
        return exported.folder_of(p) / exported.WEIGHTS
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        for _, f in list_checkpoints(d):
            if verify(f):
                return f
            _skip_unverified(f, "trying an older one")
        raise FileNotFoundError(f"no valid checkpoint in {d}; is it a run directory written by `cdc train`?")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def load_for_inference(
    ckpt: str | Path | None,
    ema: bool = True,
    device: str | torch.device = "cpu",
    runs_dir: str | Path = "runs",
):
    """(model in eval mode, Config, info) from a checkpoint file, a run dir, an exported folder
    (`cdc export`: safetensors + JSON), or the newest run."""
    from cdc.config import ConfigError, from_dict
    from cdc.nn.model import build_model

    path = resolve(ckpt, runs_dir)
    if exported.is_export(path):
        return exported.load_export(path, ema=ema, device=device)
    state = load(path)
    with reading(path):  # the stored config and weights are the file's content too
        try:
            cfg = from_dict(state["config"])
        except ConfigError as e:
            raise BadCheckpointError(f"{display(path)}: its stored config is invalid ({one_line(e)})") from None
        model = build_model(cfg)
        key = "ema" if ema and state.get("ema") is not None else "model"
        try:
            model.load_state_dict(state[key])
        except (RuntimeError, TypeError, AttributeError) as e:
            raise BadCheckpointError(
                f"{display(path)}: its {key} weights do not fit the network its config describes ({one_line(e)})"
            ) from None
    model.to(device).eval().requires_grad_(False)
    cfg, tuned = tuned_sample(cfg, path)
    info = {"path": str(path), "step": int(state.get("step", 0)), "weights": key, "sample_defaults": tuned}
    return model, cfg, info


TUNED_SAMPLE = "sample.yaml"  # RUN/sample.yaml: sampler defaults chosen after training (`cdc tune sampler`)


def tuned_sample(cfg, path: Path):
    """(cfg with RUN/sample.yaml's `sample` section over its own, that file as a str or None) for a
    checkpoint in RUN/checkpoints/: the run's sampler defaults once a tune has chosen them, for
    every checkpoint of the run; the checkpoints themselves are never rewritten for it."""
    from cdc.config import ConfigError, from_dict, to_dict
    from cdc.fileio import read_yaml

    f = path.parent.parent / TUNED_SAMPLE
    if path.parent.name != "checkpoints" or not f.is_file():
        return cfg, None
    want = "a mapping with one key, sample, holding sample settings (cdc tune sampler writes it)"
    raw = read_yaml(f, want)
    if not isinstance(raw, dict) or set(raw) != {"sample"} or not isinstance(raw["sample"], dict):
        raise bad_file(f, want, "it holds something else; delete it to use the checkpoint's own defaults")
    merged = to_dict(cfg)
    merged["sample"].update(raw["sample"])
    try:
        return from_dict(merged), str(f)
    except ConfigError as e:
        raise bad_file(f, want, f"{one_line(e)}; fix or delete it") from None


def step_guide(spec: str, ckpt: Path) -> Path | None:
    """The file a "step:N" guide names (step N beside `ckpt`), whether it exists or not; else None."""
    return ckpt.parent / ckpt_name(int(spec[5:])) if spec.startswith("step:") else None


def guide_path(spec: str, ckpt: Path, runs_dir: str | Path = "runs", key: str = "--guide") -> Path:
    """An autoguidance checkpoint file from `spec`: a file, a run dir, or "step:N" = the checkpoint
    of step N beside `ckpt` (the sampled run's own; for a few-step teacher, the teacher's run)."""
    p = step_guide(spec, ckpt)
    if p is not None:
        if not p.is_file():
            have = ", ".join(f.stem for _, f in list_checkpoints(ckpt.parent)) or "none"
            off = ", or --guide none for CFG alone" if key == "--guide" else ""
            raise FileNotFoundError(
                f"{key} {spec}: {p} does not exist (checkpoints here: {have}); keep it with "
                f"train.milestone_every or pass another {key}{off}"
            )
        return p.resolve()
    return resolve(spec, runs_dir).resolve()


def load_guide(path: Path, mcfg, ema: bool, device: str | torch.device, key: str = "--guide") -> torch.nn.Module:
    """The autoguidance net. It may be smaller (EDM2 guides with a smaller, shorter-trained net) but
    must take the same inputs as the guided model of config `mcfg`: the same stage sides, source
    noise, channels, classes and interpolant (checked)."""
    gmodel, g, _ = load_for_inference(path, ema=ema, device=device)
    same = {
        "flow.sides": (g.flow.sides, mcfg.flow.sides),
        "flow.sigma": (g.flow.sigma, mcfg.flow.sigma),
        "flow.gamma": (g.flow.gamma, mcfg.flow.gamma),
        "model.in_channels": (g.model.in_channels, mcfg.model.in_channels),
        "model.num_classes": (g.model.num_classes, mcfg.model.num_classes),
        "flow.interpolant": (g.flow.interpolant, mcfg.flow.interpolant),
        "flow.predict": (g.flow.predict, mcfg.flow.predict),
    }
    for name, (a, b) in same.items():
        if a != b:
            raise ValueError(
                f"{key} {path}: its {name} is {a!r}, the guided checkpoint's {b!r}; guide with a model of the same task"
            )
    return gmodel
