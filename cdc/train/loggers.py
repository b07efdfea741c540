"""Where a run's metrics go besides metrics.jsonl (always written): TensorBoard and W&B (train.log).

Rank 0 only. Each backend gets every numeric metrics.jsonl value under a stable name (`scalars`,
the table in docs/design-notes.md "Logging backends"), the EMA preview grid at each sample step,
and the resolved config as flat `section.key` hyper-parameters. A resumed run continues the same
TensorBoard log dir (purge_step hides what was logged past the checkpoint) and the same W&B run
(its id kept in the run dir). The packages are optional extras, checked before any work.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cdc.config import Config, ConfigError, to_dict

# metrics.jsonl key -> backend name; loss_stage's entries become train/loss_stage{k} (k as in the
# file: 0 = the coarsest stage), an evaluation's "eval" entries eval/{key} (cdc.tune.evaluate).
# `time` is each event's own wall time; `step` is the step.
NAMES = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "nonfinite_total": "train/skipped_steps",
    "grad_accum": "train/grad_accum",
    "global_batch": "train/global_batch",
    "images_per_s": "perf/images_per_s",
    "window_s": "perf/window_s",
    "tflops": "perf/tflops",
    "mfu": "perf/mfu",
    "peak_mem_gb": "perf/peak_mem_gb",
    "minutes": "run/minutes",  # on an early stop's line
    "steps": "run/steps",
}
NOT_SCALARS = ("step", "time")
GRID = "samples/ema_grid"  # the preview grid's image name
# backend -> (module imported, extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class Logger(Protocol):
    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...
    def log_image(self, step: int, name: str, image: np.ndarray) -> None: ...  # uint8 HWC
    def log_config(self, values: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line's numeric values under their backend names (None and strings left out)."""
    out = {}
    for k, v in line.items():
        if k == "loss_stage":
            out.update({f"train/loss_stage{s}": float(x) for s, x in v.items() if x is not None})
        elif k == "eval":  # evaluation during training: eval/swd_mean, eval/fid, eval/seconds, ...
            out.update({f"eval/{s}": float(x) for s, x in v.items() if _number(x)})
        elif k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[NAMES.get(k, f"other/{k}")] = float(v)  # a key added later still reaches the backends
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as `section.key` -> value, secrets masked (cdc.redact): TensorBoard and
    W&B keep it in files and on a server."""
    from cdc.redact import redact_obj

    return {f"{sec}.{k}": v for sec, d in redact_obj(to_dict(cfg)).items() for k, v in d.items()}


def check_backends(names: list[str]) -> None:
    """Import each backend's package now, so a missing one stops the run before any work; the error
    names the extra that installs it."""
    for name in names:
        if name in PACKAGES:
            module, extra = PACKAGES[name]
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"train.log: {name} needs the {module} package: pip install 'cdc[{extra}]' "
                    f"(or drop {name} from train.log)"
                ) from None


class TensorBoardLogger:
    """Event files in RUN/tensorboard; a resume at `step` hides events logged past it."""

    def __init__(self, run_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.step0 = step
        # purge_step: events at steps > the checkpoint's (logged before a crash) are dropped on read
        self.w = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()  # one line per log_every steps: cheap, and a killed run keeps its curves

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.w.add_image(name, image, step, dataformats="HWC")
        self.w.flush()

    def log_config(self, values: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # the hparams plugin takes numbers, strings and bools: lists and None as JSON text
        ok = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in values.items()}
        # at the stretch's first step, so a resume's (possibly changed) config is its own event
        for s in hparams(ok, {"train/loss": 0.0}):
            self.w.file_writer.add_summary(s, self.step0)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv with `--set` values and secrets masked while W&B records the run's metadata: it
    stores the command line (sys.argv, read when the run starts) and offers no option to filter it."""
    from cdc.redact import redact_args

    saved = sys.argv
    sys.argv = redact_args(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


class WandbLogger:
    """One W&B run per run dir: its id is kept in RUN/wandb_id.txt and resumed (resume="allow").
    WANDB_MODE, WANDB_PROJECT (default "cdc"), WANDB_ENTITY and WANDB_DIR (default the run dir) apply."""

    def __init__(self, run_dir: Path, step: int):
        import wandb

        from cdc.fileio import atomic_write_bytes

        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:16]
            atomic_write_bytes(id_file, run_id.encode())
        with redacted_argv():
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "cdc"),
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
                id=run_id,
                name=run_dir.name,
                resume="allow",
            )
        self.wandb = wandb

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def log_config(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)  # a resume may change train.*

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The run's backends as one (none off rank 0 or with only jsonl); a context manager that
    closes them however the run ends."""

    def __init__(self, backends: list[Logger]):
        self.backends = backends
        self._images: set[tuple[int, str]] = set()

    def log_metrics(self, line: dict[str, Any]) -> None:
        """One metrics.jsonl line."""
        if self.backends:
            values = scalars(line)
            for b in self.backends:
                b.log_scalars(int(line["step"]), values)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        # the last step's grid is saved twice when it is also a sample_every step: log it once
        if (step, name) in self._images:
            return
        self._images.add((step, name))
        for b in self.backends:
            b.log_image(step, name, image)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_loggers(cfg: Config, run_dir: Path, main: bool, step: int) -> Loggers:
    """The backends of train.log (rank 0, `main`), continuing the run at `step`, the config logged."""
    made: dict[str, Any] = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
    backends = [made[n](run_dir, step) for n in dict.fromkeys(cfg.train.log) if n in made] if main else []
    out = Loggers(backends)
    for b in backends:
        b.log_config(flat_config(cfg))
    return out
