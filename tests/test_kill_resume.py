"""Fault matrix (issue 30): `cdc prepare` and `cdc sample` killed with SIGKILL, then run again, end
with the bytes an uninterrupted run writes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from conftest import smooth_image_tree, subprocess_env
from typer.testing import CliRunner

import cdc.config as config
import cdc.train.checkpoint as ckpt_lib
from cdc.cli import app
from cdc.data.prepare import prepare
from cdc.nn.model import build_model

KILL = signal.SIGKILL


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (hidden ones too), by path relative to it."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN, or the process is gone
        return []


def _dead(pid: int) -> bool:
    """Gone, or a zombie (a PID 1 that does not reap leaves those)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)


def test_prepare_killed_at_five_random_moments_equals_uninterrupted(tmp_path):
    src = smooth_image_tree(tmp_path / "src", 100, [(150, 200), (200, 150), (180, 180)], (8, 8))
    kw = dict(side=64, shard_size=4, store="png", png="store", seed=7)
    ref = prepare(src, tmp_path / "ref", workers=2, progress=False, **kw)
    assert ref["count"] == 300 and len(ref["shards"]) == 75
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cdc", "prepare", "--src", str(src), "--out", str(out), "--side", "64",
           "--shard-size", "4", "--store", "png", "--png", "store", "--seed", "7", "--workers", "2"]  # fmt: skip
    env = subprocess_env(OMP_NUM_THREADS="1")
    rng = np.random.default_rng(30)
    records = lambda: len(list((out / ".prepare").glob("*.tar.json")))  # noqa: E731
    kills, workers_seen, left_behind = 0, 0, 0
    for _ in range(5):
        before = records()
        wait_shards, delay = int(rng.integers(1, 7)), float(rng.uniform(0.0, 0.06))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda b=before, w=wait_shards: records() >= b + w, proc)
        time.sleep(delay)  # a shard of 4 images takes ~30 ms a worker: the kill lands mid-shard
        workers = _children(proc.pid)
        proc.send_signal(KILL)
        assert proc.wait() == -KILL, "prepare finished before it was killed; make the tree bigger"
        kills += 1
        workers_seen += len(workers)
        # the pool's workers die with their parent (PR_SET_PDEATHSIG), so none writes on behind the re-run
        deadline = time.time() + 10
        while not all(_dead(w) for w in workers) and time.time() < deadline:
            time.sleep(0.01)
        assert all(_dead(w) for w in workers), f"pool workers {workers} outlived the killed prepare"
        assert not (out / "manifest.json").exists() and before < records() < len(ref["shards"])
        left_behind += len(list(out.glob("*.partial-*")))  # what the re-run must drop
    assert kills == 5 and workers_seen in (0, 10)  # 0: a kernel without /proc/<pid>/task/<pid>/children
    print(f"killed 5 times, {workers_seen} pool workers died with it, {left_behind} partial shards left")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.rglob("*.partial-*")) and not list(out.rglob(".*.tmp.*"))
    got, want = _tree_hashes(out), _tree_hashes(tmp_path / "ref")
    assert len(want) == 75 + 75 + 3  # shards, their records, args.json, index.npy, manifest.json
    assert got == want, sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))  # byte for byte
    assert json.loads((out / "manifest.json").read_text())["shards"] == ref["shards"]


def _tiny_run(root: Path) -> Path:
    """A run directory with one checkpoint of a tiny 3-stage DiT (8, 16, 32 px; as tests/test_generate.py)."""
    cfg = config.from_dict(
        {"model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2}, "flow": {"sides": [8, 16, 32]}}
    )
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # AdaLN-Zero / zero output layers: give them weights so outputs vary
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 10}
    ckpt_lib.save(root / "checkpoints" / "step_0000010.pt", state)
    return root



def test_sample_killed_twice_then_resumed_equals_uninterrupted(tmp_path, one_thread):
    run, n = _tiny_run(tmp_path / "tiny"), 32
    opts = ["--ckpt", str(run), "-n", str(n), "--steps", "2", "--batch", "2", "--stages", "--device", "cpu"]
    r = CliRunner().invoke(app, ["sample", *opts, "--out", str(tmp_path / "ref")])
    assert r.exit_code == 0, r.output
    out, env = tmp_path / "job", subprocess_env(OMP_NUM_THREADS="1")
    pngs = lambda: len(list((out / "images").glob("*.png")))  # noqa: E731
    rng = np.random.default_rng(30)
    for k in range(2):  # the second kill lands in a --resume run
        before, wait_images = pngs(), int(rng.integers(4, 11))
        args = [sys.executable, "-m", "cdc", "sample", *opts, "--out", str(out), *(["--resume"] if k else [])]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda b=before, w=wait_images: pngs() >= b + w, proc)
        time.sleep(float(rng.uniform(0.0, 0.05)))  # a batch of 2 takes ~0.1 s: mid-batch, mid-write
        proc.send_signal(KILL)
        assert proc.wait() == -KILL, "sample finished before it was killed; raise n"
        assert before < pngs() < n and not (out / "samples.npz").exists()
        assert json.loads((out / "samples.json").read_text())["status"] == "running"  # SIGKILL: no record
    kept = pngs()
    # what a kill inside a write leaves (too short a window to hit on purpose): the resume drops them
    planted = [out / ".samples.npz.tmp.99999", out / "images" / ".000031.png.tmp.99999"]
    planted += [out / "stages" / "stage1" / ".000030.png.tmp.99999"]
    for p in planted:
        p.write_bytes(b"half a file")
    r = CliRunner().invoke(app, ["sample", *opts, "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "samples.json").read_text())
    assert meta["status"] == "done" and meta["resumed"] == kept and meta["generated"] == n - kept
    assert not list(out.rglob(".*.tmp.*"))  # no temp file of a write cut short is left behind
    got, want = _tree_hashes(out), _tree_hashes(tmp_path / "ref")
    del got["samples.json"], want["samples.json"]  # timings and paths differ; status checked above
    # images/ and stages/stage{0,1,2}/ PNGs, 16 Fig. 9 panels, grid.png, stages.png, samples.npz, stages.npz
    assert len(want) == 4 * n + 16 + 4
    assert got == want, sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
