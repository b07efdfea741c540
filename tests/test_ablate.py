"""`cdc ablate`: every sweep's default values build valid configs, one-line errors before training,
a tiny 2-point sweep end to end, resume after an interruption, and tables equal to the per-point JSON."""

from __future__ import annotations

import csv
import json

import pytest
import typer
import yaml
from conftest import subprocess_env
from typer.testing import CliRunner

import cdc.config as C
from cdc.ablate import report as R
from cdc.ablate import runner as A
from cdc.ablate import sweeps as SW
from cdc.cli import app
from cdc.data.prepare import prepare
from cdc.eval.fmnist import load_or_train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Fashion-MNIST recipe (2 stages, 3 steps) and a small judge, shared by the module."""
    root = tmp_path_factory.mktemp("ablate")
    prepare("fashion-mnist", root / "shards", limit=128, shard_size=64, levels=3, progress=False)
    raw = {
        "model": {"preset": "tiny", "depth": 1, "width": 32, "heads": 2, "in_channels": 1, "num_classes": 10},
        "flow": {"sides": [16, 32]},
        "data": {"shards": str(root / "shards"), "workers": 0, "shuffle": 16},
        "train": {
            "batch_size": 8,
            "steps": 3,
            "log_every": 1,
            "ckpt_every": 0,
            "sample_every": 0,
            "precision": "fp32",
        },  # fmt: skip
        "sample": {"steps": 1, "cfg": 2.0, "batch": 8},
    }
    (root / "r.yaml").write_text(yaml.safe_dump(raw))
    load_or_train(root / "judge.pt", limit=256, epochs=1, verbose=False)
    return root


def test_every_sweep_default_values_build_valid_configs(tmp_path):
    listed = SW.list_sweeps()
    assert [s["name"] for s in listed] == list(SW.SWEEPS)
    for s in listed:
        p = A.plan(s["name"], out=tmp_path / s["name"])
        if s["name"] != "gamma-sigma":
            assert len(p.points) == len(s["values"].split(","))
        for pt in p.points:
            C.validate(pt.cfg)
    base = A.plan("gamma", out=tmp_path / "g").base
    g = A.plan("gamma", out=tmp_path / "g").points
    assert [pt.cfg.flow.gamma for pt in g] == [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5]  # Fig. 3's sweep
    assert all(pt.cfg.flow.sigma == 1.0 for pt in g)
    assert len(A.plan("gamma-sigma", out=tmp_path / "gs").points) == 15
    st = A.plan("stages", out=tmp_path / "s").points
    assert [pt.cfg.flow.sides for pt in st] == [[4, 8, 16, 32], [8, 32]]
    assert all(pt.cfg.flow.bounds is None for pt in st)
    assert [pt.cfg.flow.interpolant for pt in A.plan("interpolant", out=tmp_path / "i").points] == [
        "linear", "trig", "sbd"]  # fmt: skip
    assert [pt.cfg.model.res_fusion for pt in A.plan("fusion", out=tmp_path / "f").points] == ["xattn", "add"]
    tau = A.plan("tau-dist", out=tmp_path / "t").points
    assert [pt.cfg.flow.tau_dist for pt in tau] == ["uniform", "logit_normal"]
    assert [pt.cfg.model.stage_models for pt in A.plan("unified", out=tmp_path / "u").points] == [False, True]
    pos = [(pt.cfg.model.pos, pt.cfg.model.pos_units) for pt in A.plan("pos", out=tmp_path / "p").points]
    assert pos == [("rope", "final"), ("rope", "native"), ("sincos", "final")]
    # only the swept key moves away from the base
    for pt in A.plan("fusion", out=tmp_path / "f").points:
        assert C.to_dict(pt.cfg)["flow"] == C.to_dict(base)["flow"]


def test_a_sweep_point_the_sampler_cannot_serve_fails_before_any_training(tmp_path):
    """A base sampling with the SDE (linear interpolant only, like recipes/quickstart.yaml): its
    interpolant sweep needs another solver, said at plan time naming the point, not after the
    linear point has trained."""
    with pytest.raises(C.ConfigError, match=r"^interpolant value trig: sample.solver: sde .* use heun or euler$"):
        A.plan("interpolant", out=tmp_path / "i", sets=["sample.solver=sde"])
    assert C.load("recipes/quickstart.yaml").sample.solver == "sde"


def test_stages_scale_to_the_paper_path():
    k4 = C.load("recipes/k4.yaml")
    pts = SW.expand(SW.SWEEPS["stages"], None, k4)
    assert [v["flow.sides"] for _, v, _ in pts] == ["32-64-128-256", "64-256"]  # Table 6


@pytest.mark.parametrize(
    "args, msg",
    [
        (["ablate", "gamm"], "unknown ablation 'gamm'"),
        (["ablate", "gamma", "--values", "1,-2"], "flow.sigma and flow.gamma must be > 0"),
        (["ablate", "interpolant", "--values", "linear,cubic"], "flow.interpolant: 'cubic' is not one of"),
        (["ablate", "pos", "--values", "alibi"], "pos takes"),
        (["ablate", "gamma", "--values", "1,two"], "gamma needs numbers"),
        (["ablate", "stages", "--values", "8-16"], "must end at the base recipe's final side 32"),
        (["ablate", "gamma-sigma", "--values", "1,2"], "GAMMAS x SIGMAS"),
        (["ablate"], "give an ablation NAME"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, args, msg):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert msg in res.output and res.output.count("\n") == 1
    assert not (out / "points").exists()


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["ablate", "gamma", "--out", str(blocker / "sub")])
    assert res.exit_code == 2 and "is not writable" in res.output and res.output.count("\n") == 1


def test_list(tmp_path):
    res = CliRunner().invoke(app, ["ablate", "--list"])
    assert res.exit_code == 0
    for name in SW.SWEEPS:
        assert name in res.output
    assert "Fig. 3" in res.output and "Table 4" in res.output
    # `cdc ablate --help` names every sweep too (the help text is written out, not imported)
    cmd = typer.main.get_command(app).commands["ablate"]
    names = next(p.help for p in cmd.params if p.name == "name")
    assert all(f"{n}," in names or f"{n} (" in names for n in SW.SWEEPS), names


def test_two_point_sweep_end_to_end_and_resume(tiny, tmp_path, monkeypatch):
    import cdc.train.loop as T

    real, calls = T.train, []

    def train_once(cfg, run_dir, progress=True):  # the "kill": SIGTERM while training the second point
        calls.append(run_dir.parent.name)
        out = real(cfg, run_dir, progress)
        return {**out, "stopped": True} if len(calls) == 2 else out  # train saved and returned early

    monkeypatch.setattr(T, "train", train_once)
    out = tmp_path / "sweep"
    p = A.plan("gamma", tiny / "r.yaml", "1,3", out, samples=8)
    with pytest.raises(KeyboardInterrupt):
        A.run_sweep(p, progress=False, judge=tiny / "judge.pt")
    first = out / "points" / "gamma-1" / "result.json"
    assert first.is_file() and not (out / "points" / "gamma-3" / "result.json").exists()
    stamp = first.stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(T, "train", lambda *a, **k: (calls.append(a[1].parent.name), real(*a, **k))[1])
    rows = A.run_sweep(
        A.plan("gamma", tiny / "r.yaml", "1,3", out, samples=8), progress=False, judge=tiny / "judge.pt"
    )
    assert calls == ["gamma-3"] and first.stat().st_mtime_ns == stamp  # only the second point ran

    per_point = [
        json.loads((out / "points" / lab / "result.json").read_text()) for lab in ("gamma-1", "gamma-3")
    ]
    assert rows == per_point
    for r, g in zip(per_point, (1.0, 3.0)):
        assert r["flow.gamma"] == g and r["train_steps"] == 3 and r["samples"] == 8
        for k in (
            "swd",
            "judge_accuracy",
            "judge_fd",
            "sample_sec_per_image",
            "train_images_per_s",
            "params",
        ):
            assert isinstance(r[k], (int, float)), k
        cfg = C.load(out / "points" / r["point"] / "config.yaml")
        assert cfg.flow.gamma == g  # the resolved config of the point sits next to it

    # CSV: exact values; Markdown: the same values through fmt; PNG: the plotted series
    with open(out / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert [row["point"] for row in got] == ["gamma-1", "gamma-3"]
    for row, r in zip(got, per_point):
        for k, v in r.items():
            assert (float(row[k]) == v) if isinstance(v, (int, float)) else row[k] == str(v), k
    md = (out / "results.md").read_text().splitlines()
    cols = R.columns(per_point, ["flow.gamma"])
    table = [ln for ln in md if ln.startswith("| gamma-")]
    for ln, r in zip(table, per_point):
        assert ln == "| " + " | ".join(R.fmt(c, r.get(c)) for c in cols) + " |"
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = R.plot(tmp_path / "again.png", per_point, ["flow.gamma"], "t")
    assert drawn["swd"] == ([1.0, 3.0], [r["swd"] for r in per_point])
    assert drawn["judge_accuracy"][1] == [r["judge_accuracy"] for r in per_point]
    assert json.loads((out / "sweep.json").read_text())["points"] == ["gamma-1", "gamma-3"]


def test_resume_refuses_changed_settings(tiny, tmp_path):
    out = tmp_path / "s"
    p = A.plan("fusion", tiny / "r.yaml", "add", out, samples=4)
    A.run_sweep(p, progress=False, judge=None)
    (out / "points" / "fusion-add" / "result.json").unlink()  # unfinished point, then another base
    p2 = A.plan("fusion", tiny / "r.yaml", "add", out, samples=4, sets=["train.lr=0.5"])
    with pytest.raises(C.ConfigError, match="different settings"):
        A.run_sweep(p2, progress=False, judge=None)


def test_sampling_sweep_trains_once_and_grid_heatmap(tiny, tmp_path):
    out = tmp_path / "cfg"
    rows = A.run_sweep(A.plan("cfg", tiny / "r.yaml", "1,2", out, samples=4), progress=False, judge=None)
    assert [r["sample.cfg"] for r in rows] == [1.0, 2.0]
    assert (out / "base" / "run").is_dir() and not (out / "points" / "cfg-1" / "run").exists()
    assert rows[0]["params"] == rows[1]["params"] and rows[0]["train_steps"] == 3
    grid = [{"point": f"g{g}-s{s}", "flow.gamma": g, "flow.sigma": s, "swd": g * 10 + s}
            for g in (1.0, 2.0) for s in (0.5, 1.0)]  # fmt: skip
    drawn = R.plot(tmp_path / "grid.png", grid, ["flow.gamma", "flow.sigma"], "t")
    gx, gy, mat = drawn["swd"]
    assert gx == [1.0, 2.0] and gy == [0.5, 1.0] and mat == [[10.5, 20.5], [11.0, 21.0]]


@pytest.mark.slow
def test_torchrun_two_ranks_run_each_point_together(tiny, tmp_path):
    """Both ranks train and sample every point (DDP, split sampling); rank 0 scores and writes."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "runs").mkdir()
    shutil.copy(tiny / "judge.pt", tmp_path / "runs" / "fmnist-classifier.pt")  # the judge's cache path
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cdc",
           "ablate", "unified", "--recipe", str(tiny / "r.yaml"), "--out", str(tmp_path / "o"),
           "--samples", "6", "--set", "train.batch_size=4", "--set", "train.grad_accum=2"]  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert [r["unified"] for r in rows] == ["unified", "stage-specific"]
    assert int(rows[1]["params"]) == 2 * int(rows[0]["params"])  # two stages, one DiT each
    assert [(r["global_batch"], r["processes"]) for r in rows] == [("16", "2")] * 2  # 4 x grad_accum 2 x 2 ranks
    assert "global batch 16 (4 per process × grad_accum 2 × 2 processes)" in (tmp_path / "o" / "results.md").read_text()
    for lab in ("unified-unified", "unified-stage-specific"):
        s = json.loads((tmp_path / "o" / "points" / lab / "samples" / "samples.json").read_text())
        assert s["world_size"] == 2 and s["generated"] == 6


def _metrics(run_dir, lines):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _line(step, window_s, t, global_batch=16, grad_accum=2, **extra):
    return {"step": step, "loss": 1 / step, "images_per_s": 160 / window_s, "window_s": window_s,
            "grad_accum": grad_accum, "global_batch": global_batch, "time": t, **extra}  # fmt: skip


def test_report_states_the_global_batch_and_sums_resumed_stretches(tmp_path):
    """Fabricated run folders: 2 processes x batch_size 4 x grad_accum 2 is a global batch of 16;
    a point cut at step 25 (lines past its step-20 checkpoint dropped) and resumed trained for
    3 + 4 s in its first stretch and 5 + 6 s in its second: 18 s, not the last stretch's 11."""
    out = tmp_path / "o"
    p = A.plan("gamma", values="1,3", out=out, sets=["train.batch_size=4", "train.grad_accum=2"])
    stretches = {
        "gamma-1": [_line(10, 3.0, 1003.0), _line(20, 4.0, 1007.0), _line(30, 5.0, 2005.0), _line(40, 6.0, 2011.0)],
        "gamma-3": [_line(10, 2.5, 5002.5), _line(20, 2.5, 5005.0), _line(30, 2.5, 5007.5), _line(40, 2.5, 5010.0)],
    }  # fmt: skip
    rows = []
    for pt in p.points:
        _metrics(out / "points" / pt.label / "run", stretches[pt.label])
        tr = A.train_summary(pt.cfg, out / "points" / pt.label / "run")
        rows.append({"point": pt.label, **pt.value, **tr, "swd": 0.001})
    assert [(r["train_seconds"], r["global_batch"], r["processes"], r["train_steps"]) for r in rows] == [
        (18.0, 16, 2, 40), (10.0, 16, 2, 40)]  # fmt: skip
    R.write(out, p.sweep, rows, p)
    md = (out / "results.md").read_text()
    assert "600 optimizer steps of global batch 16 (4 per process × grad_accum 2 × 2 processes)" in md
    table = [ln.strip("|").split(" | ") for ln in md.splitlines() if ln.startswith("| ")]
    head, body = [c.strip() for c in table[0]], [[c.strip() for c in r] for r in table[1:]]
    cells = [dict(zip(head, r)) for r in body]
    assert [(c["global batch"], c["processes"], c["train s"]) for c in cells] == [("16", "2", "18"), ("16", "2", "10")]
    got = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["global_batch"], r["train_seconds"]) for r in got] == [("16", "18.0"), ("16", "10.0")]


def test_run_budget_older_lines_and_a_resume_on_more_ranks():
    """Lines without window_s (written before it was logged) give images / images_per_s: 160
    images (global batch 16, steps 10 -> 20) at 40 img/s are 4 s. A run resumed from 1 process
    (global batch 8 = 4 x grad_accum 2) on 2 says both."""
    from cdc.train.run_files import run_budget

    old = {"step": 20, "loss": 0.5, "images_per_s": 40.0, "grad_accum": 2, "global_batch": 16, "time": 9.0}
    lines = [_line(10, 3.0, 3.0, global_batch=8), old]
    assert run_budget(lines, batch_size=4) == {"train_seconds": 7.0, "global_batch": "8→16", "processes": "1→2"}
    assert R.batch_text([{"global_batch": "8→16", "processes": "1→2"}], 4) == "global batch 8→16"
    assert R.batch_text([{"swd": 1.0}], 4) == "batch 4 per process"  # rows from before the batch was logged
    assert run_budget([], 4) == {"train_seconds": None, "global_batch": None, "processes": None}


def test_params_are_counted_on_the_meta_device(monkeypatch):
    """Same count as the real model on tiny configs, with no weight allocated; the paper's k4 with a
    DiT per stage (~11 GB of fp32 weights) counts in a second as 4 x its unified DiT."""
    import cdc.nn.model as M

    built = []

    def spy(cfg):
        m = real_build(cfg)
        built.append({p.device.type for p in m.parameters()})
        return m

    real_build = M.build_model
    for stage_models in (False, True):
        cfg = C.from_dict(C.to_dict(C.load(SW.DEFAULT_RECIPE)), [f"model.stage_models={str(stage_models).lower()}"])
        real = M.count_params(real_build(cfg))
        monkeypatch.setattr(M, "build_model", spy)
        assert A.count_point_params(cfg) == real and built[-1] == {"meta"}
        monkeypatch.setattr(M, "build_model", real_build)
    k4 = C.to_dict(C.load("recipes/k4.yaml"))
    unified = A.count_point_params(C.from_dict(k4, ["model.stage_models=false"]))
    assert A.count_point_params(C.from_dict(k4, ["model.stage_models=true"])) == 4 * unified


def test_an_interrupted_point_reports_both_stretches(tiny, tmp_path, monkeypatch):
    """A real point trained 2 steps, stopped, then resumed by the sweep to 4: train s is the loop
    time of both stretches (each window timed from its own stretch's start), within each stretch's
    wall time measured here."""
    import time

    import cdc.train.loop as T

    out = tmp_path / "o"
    p = A.plan("fusion", tiny / "r.yaml", "add", out, train_steps=4, samples=4)
    run = out / "points" / "fusion-add" / "run"
    t0 = time.perf_counter()
    T.train(C.from_dict(C.to_dict(p.points[0].cfg), ["train.steps=2"]), run, progress=False)
    first = time.perf_counter() - t0
    real, second = T.train, []

    def timed(*a, **k):
        t0 = time.perf_counter()
        res = real(*a, **k)
        second.append(time.perf_counter() - t0)
        return res

    monkeypatch.setattr(T, "train", timed)
    (row,) = A.run_sweep(p, progress=False, judge=None)
    m = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m] == [1, 2, 3, 4] and len(second) == 1
    w = [x["window_s"] for x in m]
    assert row["train_seconds"] == pytest.approx(sum(w), rel=1e-12) and row["train_steps"] == 4
    assert sum(w[:2]) <= first and sum(w[2:]) <= second[0]
    assert m[2]["time"] - w[2] >= m[1]["time"]  # the second stretch's first window starts after the first ended
    assert row["global_batch"] == 8 and row["processes"] == 1  # tiny: batch_size 8, one process
