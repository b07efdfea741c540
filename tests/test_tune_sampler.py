"""`cdc tune sampler` on a tiny randomised DiT: resumes after an interruption without repeating a
trial, never writes a checkpoint, writes the chosen defaults to RUN/sample.yaml (which sampling then uses), and its
last line is the `cdc sample` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run
from typer.testing import CliRunner

from cdc import config as C
from cdc.eval import detail as D
from cdc.eval.metrics import frechet_distance, gaussian_stats
from cdc.train.checkpoint import load_for_inference
from cdc.tune import objective as O
from cdc.tune import sampler as S

COORDS = ("solver", "cfg_rest")  # the start, 2 more solvers, 3 more refinement CFG scales: 6 distinct trials


def _real(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = D.gaussian_blur(torch.randn(n, 1, 16, 16, generator=g) * 0.6, 0.8).clamp(-1, 1)
    return x, torch.arange(n) % 10


def _objective() -> O.Objective:
    """A cheap stand-in judge: Frechet distance of 4x4 mean-pooled pixels (16 features) to real ones."""
    ref, _ = _real(64, 0)
    feats = torch.nn.functional.avg_pool2d(ref, 4).flatten(1).double().numpy()
    mu, sigma = gaussian_stats(feats, "reference")

    def semantic(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        f = torch.nn.functional.avg_pool2d(x, 4).flatten(1).double().numpy()
        return {"fd": frechet_distance(*gaussian_stats(f, "samples"), mu, sigma), "accuracy": 0.0}

    real, labels = _real(24, 1)  # 6 calibration blocks of 4
    return O.Objective("pooled-pixel FD", semantic, D.detail_reference(ref), real, labels)


@pytest.fixture
def run(tmp_path) -> Path:
    raw = {
        "model": {
            "preset": "tiny",
            "in_channels": 1,
            "num_classes": 3,
            "patch": 2,
            "depth": 1,
            "width": 32,
            "heads": 2,
        },
        "flow": {"sides": [8, 16]},
        "sample": {"steps": [2], "cfg": [1.5], "solver": "euler", "batch": 8},
    }
    r = tiny_run(tmp_path, raw)
    (r / "config.yaml").write_text(C.dump(C.from_dict(raw)))
    return r


def _checkpoint_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}


def _records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_resumes_after_interruption_without_repeating_a_trial(run, one_thread):
    obj, before = _objective(), _checkpoint_bytes(run)
    kw = dict(n=4, coords=COORDS, heldout_blocks=1, write_defaults=False, log=lambda s: None)
    first = S.tune_sampler(run, obj, max_trials=2, **kw)
    assert not first.finished and first.new_trials == 2
    log = run / "tune" / "sampler.jsonl"
    with open(log, "a") as f:
        f.write('{"id": "trial|0|4|torn')  # a record cut off mid-write by the interruption
    second = S.tune_sampler(run, obj, **kw)
    assert second.finished
    trials = [r for r in _records_tolerant(log) if r.get("phase") == "trial"]
    ids = [r["id"] for r in trials]
    assert len(ids) == len(set(ids)) == 6  # every distinct trial once, none repeated
    held = 1 if second.best == second.base else 2  # a held-out block per distinct setting (run's own, chosen)
    assert second.new_trials == 6 - 2 + held  # the four trials left and the held-out blocks
    third = S.tune_sampler(run, obj, **kw)
    assert third.new_trials == 0 and third.best == second.best  # a finished search only re-reads its log
    best_rec = min(trials, key=lambda r: r["objective"])
    assert (
        S.Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in best_rec["setting"].items()})
        == second.best
    )
    assert _checkpoint_bytes(run) == before


def _records_tolerant(path: Path) -> list[dict]:
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def test_cli_writes_defaults_never_checkpoints_and_ends_with_the_command(run, one_thread, monkeypatch):
    from cdc.cli import app

    monkeypatch.setattr(O, "fmnist_objective", lambda clf: _objective())
    before, raw_before = _checkpoint_bytes(run), yaml.safe_load((run / "config.yaml").read_text())
    r = CliRunner().invoke(app, ["tune", "sampler", str(run), "--n", "4", "--coords", ",".join(COORDS),
                                 "--heldout-blocks", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]  # progress goes to stderr
    assert last.startswith(f"cdc sample --ckpt {run} --solver ")
    assert _checkpoint_bytes(run) == before
    assert C.load(run / "config.yaml") == C.from_dict(raw_before)  # the record of training is untouched
    trials = [x for x in _records(run / "tune" / "sampler.jsonl") if x["phase"] == "trial"]
    best = min(trials, key=lambda x: x["objective"])["setting"]
    _, cfg, info = load_for_inference(run)  # what cdc sample --ckpt RUN samples with from now on
    assert info["sample_defaults"] == str(run / "sample.yaml")
    assert (cfg.sample.solver, cfg.sample.cfg, cfg.sample.steps) == (best["solver"], best["cfg"], best["steps"])
    assert (
        f"--solver {best['solver']} " in last and "--cfg " + ",".join(f"{v:g}" for v in best["cfg"]) in last
    )
    assert (run / "tune" / "sampler.md").is_file() and (run / "tune" / "sampler.png").stat().st_size > 1000


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    obj = _objective()
    with pytest.raises(ValueError, match="not a training run"):
        S.tune_sampler(tmp_path, obj)
    with pytest.raises(ValueError, match="checkpoint folder"):
        S.tune_sampler(run, obj, out=run / "checkpoints")
    with pytest.raises(ValueError, match="unknown coordinate"):
        S.tune_sampler(run, obj, coords=("colour",))


def test_step_splits_keep_the_total_and_candidates_start_with_the_current_setting():
    for steps in ((16, 16, 16), (24, 24), (5, 7, 9, 11)):
        assert all(sum(s) == sum(steps) and min(s) >= 1 for s in S.step_splits(steps))
    base = S.Setting("sde", (16, 16, 16), (2.25, 1.5, 1.5), (0.0, 1.0), (2.0, 2.0, 2.0))
    for coord in S.COORDS:
        c = S.candidates(base, coord, guided=True, posthoc=True)
        assert c[0] == base and len(c) == len(set(c)) >= 2
    assert S.candidates(base, "guide_rest", guided=False) == [base]
    assert S.candidates(base, "ema", guided=True, posthoc=False) == [base]


def test_ema_lengths_are_searched_in_memory_from_post_hoc_snapshots(tmp_path, one_thread):
    """A run with post-hoc EMA snapshots: each length is rebuilt into the loaded model (the tracked
    sigma_rel 0.05 equals its own profile), nothing is written beside the checkpoints, and a chosen
    length's command rebuilds it with `cdc tune ema` first."""
    from cdc.data.prepare import prepare
    from cdc.train import posthoc_ema as PH
    from cdc.train.loop import train
    from cdc.tune.posthoc_weights import PosthocWeights

    shards = tmp_path / "shards"
    prepare("fashion-mnist", shards, limit=64, shard_size=64, progress=False)
    raw = {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4, "depth": 1, "width": 32,
                  "heads": 2},
        "flow": {"sides": [8, 16]},
        "data": {"shards": str(shards), "workers": 0},
        "train": {"batch_size": 4, "steps": 8, "lr": 1e-3, "log_every": 4, "ckpt_every": 4, "sample_every": 0,
                  "precision": "fp32", "ema_decay": 0.99, "ema_snapshots": 4, "ema_snapshot_dtype": "float32"},
        "sample": {"steps": [1], "cfg": [1.0], "batch": 16},
    }  # fmt: skip
    run = tmp_path / "run"
    train(C.from_dict(raw), run, progress=False)
    before = _checkpoint_bytes(run)

    from cdc.sample.api import load

    gen = load(run, device="cpu")
    w = PosthocWeights(run, gen.model, 8)
    assert w.available
    w.use(0.05)
    snap = PH.read_snapshot(PH.list_snapshots(run)[-1][1])
    for k, v in dict(gen.model.named_parameters()).items():
        torch.testing.assert_close(v, snap.profiles[0][k].float(), atol=1e-5, rtol=0)
    w.use(0.0)
    assert all(torch.equal(v, w.own[k]) for k, v in gen.model.state_dict().items())

    obj = _objective()
    res = S.tune_sampler(
        run, obj, n=4, coords=("ema",), heldout_blocks=1, write_defaults=False, log=lambda s: None
    )
    emas = sorted(r["setting"].get("ema", 0.0) for r in res.trials)
    assert emas == [0.0, *S.EMA_LENGTHS]
    assert len({r["swd_fine"] for r in res.trials}) == len(emas)  # each length made other images
    assert _checkpoint_bytes(run) == before and sorted(before) == sorted(
        p.name for p in (run / "checkpoints").iterdir()
    )
    if res.best.ema:
        assert res.command.startswith(
            f"cdc tune ema {run} --sigma-rel {res.best.ema:g} && cdc sample --ckpt "
        )


def test_a_bad_sample_yaml_is_one_line_naming_it(run):
    (run / "sample.yaml").write_text("sample: {solver: rk45}\n")
    with pytest.raises(ValueError, match="sample.yaml.*solver"):
        load_for_inference(run)
    (run / "sample.yaml").write_text("model: {depth: 99}\n")  # only the sample section may be set
    with pytest.raises(ValueError, match="sample.yaml: .*one key, sample"):
        load_for_inference(run)
    (run / "sample.yaml").unlink()
    assert load_for_inference(run)[2]["sample_defaults"] is None
