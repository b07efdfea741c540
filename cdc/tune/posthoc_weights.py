"""A loaded model's weights at any EMA length its run's post-hoc EMA snapshots allow, swapped in
place (cdc.tune.ema's reconstruction, in memory: `cdc tune sampler` writes no checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch

from cdc.train import posthoc_ema as PH
from cdc.tune import ema as E


class PosthocWeights:
    """`use(sigma_rel)` loads the EMA of that length into `model`; `use(0)` restores its own weights.
    Available only when the run has snapshots of the model's checkpoint step."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, step: int):
        self.model = model
        self.own = {k: v.clone() for k, v in model.state_dict().items()}
        self.sources: list[E.Source] = []
        if step in [s for s, _ in PH.list_snapshots(run_dir)]:
            self.sources, _, self.last = E.snapshot_sources(run_dir, step)
            self.names = E.param_names(self.last.config)
        self.current = 0.0

    @property
    def available(self) -> bool:
        return bool(self.sources)

    def use(self, sigma_rel: float) -> None:
        if sigma_rel == self.current:
            return
        state = dict(self.own)
        if sigma_rel:
            fit = E.solve(self.sources, self.last.step - self.last.start, sigma_rel)
            rebuilt = E.combine(self.sources, [fit], self.names)[0]
            state.update({k: v.to(self.own[k].dtype) for k, v in rebuilt.items()})
        self.model.load_state_dict(state)
        self.current = sigma_rel
