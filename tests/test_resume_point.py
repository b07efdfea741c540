"""A 2-rank job (gloo, on this machine) resumes from the checkpoint rank 0 chooses, checks that its
ranks hold the same state, and stops every rank with one line when a rank cannot read the file,
holds a different state, or rank 0 cannot write a checkpoint."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
from conftest import free_port

from cdc.config import from_dict
from cdc.data.prepare import prepare


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=64, shard_size=16, progress=False)
    return out


def raw(shards: Path, steps: int) -> dict:
    return {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4, "depth": 1, "width": 32, "heads": 2},
        "flow": {"sides": [8, 16, 32]},
        "data": {"shards": str(shards), "workers": 0},
        "train": {"batch_size": 4, "steps": steps, "log_every": 1, "ckpt_every": 2, "sample_every": 0,
                  "milestone_every": 0, "precision": "fp32", "keep_last": 5},
    }


def _worker(rank: int, world: int, port: int, cfg: dict, run: str, mode: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cdc.fileio import WriteFailedError
    from cdc.train import checkpoint as C
    from cdc.train import distributed as D
    from cdc.train.loop import train

    real_load = C.load
    if rank == 1 and mode == "unreadable":  # a run folder that is not shared with this node
        C.load = lambda path, *a, **k: (_ for _ in ()).throw(FileNotFoundError(2, "No such file", str(path)))
    if rank == 1 and mode == "stale":  # this node's listing shows only an older checkpoint
        C.list_checkpoints = lambda d: [(s, p) for s, p in [(2, Path(d) / C.ckpt_name(2))]]
    if rank == 1 and mode == "differs":  # the file read here is not the one rank 0 read

        def load(path, *a, **k):
            state = real_load(path, *a, **k)
            state["ema"] = {n: v + 1 if v.is_floating_point() else v for n, v in state["ema"].items()}
            return state

        C.load = load
    if rank == 0 and mode in ("save_fails", "background_save_fails"):
        C.save = lambda path, state: (_ for _ in ()).throw(WriteFailedError(28, f"{path}: no space left on device (ENOSPC)"))
    t0 = time.monotonic()
    result = {"rank": rank}
    try:
        res = train(from_dict(cfg), Path(run), progress=False)
        result["step"] = res["step"]
    except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
        result |= {"error": type(e).__name__, "message": str(e)}
    result["seconds"] = time.monotonic() - t0
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    D.shutdown()


def run_two(shards: Path, run: Path, mode: str, tmp_path: Path, steps: int = 6) -> list[dict]:
    out = tmp_path / f"out-{mode}"
    out.mkdir()
    tmp.spawn(_worker, (2, free_port(), raw(shards, steps), str(run), mode, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(2)]


def first_run(shards: Path, run: Path) -> None:
    from cdc.train.loop import train

    train(from_dict(raw(shards, 4)), run, progress=False)  # checkpoints at steps 2 and 4


def test_every_rank_resumes_rank_0s_choice(shards, tmp_path):
    first_run(shards, tmp_path / "run")
    res = run_two(shards, tmp_path / "run", "stale", tmp_path)
    assert [r.get("step") for r in res] == [6, 6], res  # rank 1's stale view (step 2) is not used
    from cdc.train import checkpoint as C

    state, _ = C.load_latest(tmp_path / "run" / "checkpoints", need=C.RESUME_KEYS)
    assert state["step"] == 6 and len(state["ranks"]) == 2
    assert state["ranks"][0]["data"]["position"] == state["ranks"][1]["data"]["position"]


@pytest.mark.parametrize(
    "mode, error, words",
    [
        ("unreadable", "ValueError", "rank(s) 1 could not read"),
        ("differs", "ResumeMismatchError", "rank(s) 1 hold a different model, EMA or optimizer state"),
        ("save_fails", "SaveFailedError", "no space left on device"),  # the run's last save, waited for
        # a periodic save written in the background (step 6) fails: every rank stops at the next save
        ("background_save_fails", "SaveFailedError", "step_0000006.pt: no space left on device"),
    ],
)
def test_a_rank_that_fails_stops_every_rank_with_one_line(shards, tmp_path, mode, error, words):
    first_run(shards, tmp_path / "run")
    res = run_two(shards, tmp_path / "run", mode, tmp_path, steps=8 if mode == "background_save_fails" else 6)
    assert [r.get("error") for r in res] == [error, error], res
    assert res[0]["message"] == res[1]["message"] and words in res[0]["message"] and "\n" not in res[0]["message"]
    assert max(r["seconds"] for r in res) < 60  # agreed at once, not at a collective's 30-minute timeout
    from cdc.train import checkpoint as C

    assert [s for s, _ in C.list_checkpoints(tmp_path / "run" / "checkpoints")] == [4, 2]  # nothing newer kept


def test_background_saves_hold_what_waited_for_saves_hold(shards, tmp_path):
    """train.async_save writes each periodic checkpoint from a copy taken at its step: the files
    hold the same weights, EMA, optimizer, RNG and data states as saves the step waits for."""
    from cdc.train import checkpoint as C
    from cdc.train.loop import train

    got = {}
    for flag in (False, True):
        cfg = raw(shards, 6)
        cfg["train"]["async_save"] = flag
        train(from_dict(cfg), tmp_path / str(flag), progress=False)
        got[flag] = {s: C.load(p, need=C.RESUME_KEYS) for s, p in C.list_checkpoints(tmp_path / str(flag) / "checkpoints")}
    assert sorted(got[True]) == sorted(got[False]) == [2, 4, 6]
    for step, a in got[False].items():
        b = got[True][step]
        for key in ("model", "ema"):
            assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), (step, key)
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i] if torch.is_tensor(sa[i][k]))
        assert a["ranks"][0]["data"] == b["ranks"][0]["data"] and torch.equal(a["ranks"][0]["gen"], b["ranks"][0]["gen"])
        assert a["reason"] == b["reason"]
