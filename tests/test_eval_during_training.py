"""Evaluation during training (train.eval_every): the metrics line it adds, the same numbers at 1
and 2 ranks, the post-hoc EMA it can evaluate, the stored reference it can compare with, and the
backends' names for its values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp
from conftest import free_port, tiny_recipe

from cdc.config import ConfigError, from_dict
from cdc.data.prepare import prepare
from cdc.train import checkpoint as C
from cdc.train.loggers import scalars
from cdc.train.loop import train
from cdc.tune.evaluate import TrainingEvaluation


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=64, shard_size=32, progress=False)
    return out


def recipe(shards, sides=(8, 16), **train) -> dict:
    t = dict(batch_size=4, steps=8, lr=1e-3, log_every=3, ckpt_every=0, sample_every=0, precision="fp32",
             ema_decay=0.9, eval_every=4, eval_n=12)  # fmt: skip
    t.update(train)
    return tiny_recipe(shards, t, sides)


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_eval_lines_in_metrics_jsonl(shards, tmp_path, one_thread):
    run = tmp_path / "run"
    train(from_dict(recipe(shards)), run, progress=False, evaluation=TrainingEvaluation)
    m = metrics(run)
    assert [x["step"] for x in m] == [3, 4, 6, 8]  # log_every 3, and every evaluation's step
    evals = {x["step"]: x["eval"] for x in m if "eval" in x}
    assert sorted(evals) == [4, 8]
    for e in evals.values():
        assert {"swd_level0", "swd_mean", "seconds", "n", "weights"} <= set(e)
        assert e["n"] == 12 and e["weights"] == "ema" and e["seconds"] > 0
        assert all(math.isfinite(v) and v >= 0 for k, v in e.items() if k.startswith("swd"))
    assert evals[4]["swd_mean"] != evals[8]["swd_mean"]  # the EMA moved between them
    # the evaluation's time is not counted as training time
    assert all(x["window_s"] < evals[4]["seconds"] * 20 for x in m)


def test_eval_leaves_training_as_it_was(shards, tmp_path, one_thread):
    """The same weights with and without evaluations: sampling draws from no training stream."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(from_dict(recipe(shards, eval_every=0, log_every=2)), a, progress=False)
    train(from_dict(recipe(shards, log_every=2)), b, progress=False, evaluation=TrainingEvaluation)
    sa, _ = C.load_latest(a / "checkpoints")
    sb, _ = C.load_latest(b / "checkpoints")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    assert [x["loss"] for x in metrics(a)] == [x["loss"] for x in metrics(b)]


def test_eval_of_a_posthoc_ema_and_the_fashion_mnist_judge(shards, tmp_path, one_thread, monkeypatch):
    from cdc.eval import fmnist
    from cdc.tune import evaluate

    judge = tmp_path / "judge.pt"
    fmnist.load_or_train(judge, fmnist.ASSETS, epochs=1, limit=256, verbose=False, width=8)
    monkeypatch.setattr(evaluate, "JUDGE", judge)
    run = tmp_path / "run"
    cfg = recipe(shards, sides=(16, 32), ema_snapshots=2, eval_sigma_rel=0.07, eval_fmnist=True)
    train(from_dict(cfg), run, progress=False, evaluation=TrainingEvaluation)
    e = [x["eval"] for x in metrics(run) if "eval" in x][-1]
    assert e["weights"] == "posthoc:0.070"
    assert 0 <= e["fmnist_accuracy"] <= 1 and math.isfinite(e["fmnist_fd"]) and math.isfinite(e["swd_mean"])
    with pytest.raises(ConfigError, match="eval_fmnist"):
        from_dict(recipe(shards, eval_fmnist=True))  # 16 px: not the judge's images


def test_eval_against_a_stored_swd_reference(shards, tmp_path, one_thread):
    from cdc.eval.reference import build_reference

    ref = tmp_path / "ref.npz"
    build_reference(
        shards, ref, side=16, metrics="swd", swd_images=32, swd_per_image=8, seed=3, progress=False
    )
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=4, eval_ref=str(ref))), run, progress=False, evaluation=TrainingEvaluation)
    e = metrics(run)[-1]["eval"]
    assert math.isfinite(e["swd_mean"]) and "fid" not in e
    bad = recipe(shards, steps=4, eval_ref=str(tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match="train.eval_ref: reference not found"):
        train(from_dict(bad), tmp_path / "bad", progress=False, evaluation=TrainingEvaluation)
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before any step


def test_backends_get_the_eval_values_under_eval_names():
    line = {"step": 4, "loss": 1.0, "eval": {"swd_mean": 0.5, "fid": 3.0, "weights": "ema", "n": 12}}
    assert scalars(line) == {"train/loss": 1.0, "eval/swd_mean": 0.5, "eval/fid": 3.0, "eval/n": 12.0}


# ----------------------------------------------------------------------------- 1 rank and 2 ranks


def _model(cfg):
    from cdc.nn.model import build_model

    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():  # zero-initialised output layers would make every image alike
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _eval_worker(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from cdc.train import distributed as D
    from cdc.tune.evaluate import Evaluator

    cfg = from_dict(raw)
    res = Evaluator(cfg, D.init())(_model(cfg), "ema")
    Path(out, f"{rank}.json").write_text(json.dumps({k: v for k, v in res.items() if k != "seconds"}))
    D.shutdown()


def test_the_same_numbers_at_1_and_2_ranks(shards, tmp_path, one_thread):
    raw = recipe(shards, eval_n=11)  # not a multiple of the ranks: rank 0 samples one more
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _eval_worker_single(raw, one)
    tmp.spawn(_eval_worker, (2, free_port(), raw, str(two)), nprocs=2, join=True)
    a = json.loads((one / "0.json").read_text())
    assert a == json.loads((two / "0.json").read_text()) == json.loads((two / "1.json").read_text())
    assert np.isfinite(a["swd_mean"])


def _eval_worker_single(raw: dict, out: Path) -> None:
    from cdc.train import distributed as D
    from cdc.tune.evaluate import Evaluator

    cfg = from_dict(raw)
    res = Evaluator(cfg, D.init())(_model(cfg), "ema")
    (out / "0.json").write_text(json.dumps({k: v for k, v in res.items() if k != "seconds"}))


def test_a_caller_that_gives_no_evaluation_is_refused_before_any_work(shards, tmp_path):
    with pytest.raises(ConfigError, match="train.eval_every: this caller gives no evaluation"):
        train(from_dict(recipe(shards, steps=4)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
