import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, subprocess_env
from typer.testing import CliRunner

from cdc.cli import app
from cdc.config import ConfigError, from_dict
from cdc.data.prepare import prepare
from cdc.train import checkpoint as C
from cdc.train import posthoc_ema as PH
from cdc.train.loop import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=256, shard_size=64, progress=False)
    return out


def recipe(shards, **train):
    t = dict(
        batch_size=8,
        steps=12,
        lr=1e-3,
        log_every=1,
        ckpt_every=4,
        keep_last=10,
        sample_every=0,
        precision="fp32",
        ema_decay=0.99,
    )
    t.update(train)
    return {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16, 32]},
        "data": {"shards": str(shards), "workers": 0, "shuffle": 64},
        "train": t,
        "sample": {"steps": 2, "cfg": 2.0, "batch": 16},
    }


def write_recipe(tmp_path, raw, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def final_state(run):
    state, _ = C.load_latest(run / "checkpoints")
    return state


def cli_env():
    env = subprocess_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_tiny_run_writes_run_dir(shards, tmp_path):

    run = tmp_path / "run"
    out = train(from_dict(recipe(shards, steps=6, sample_every=6)), run, progress=False)
    assert out["step"] == 6
    assert (run / "config.yaml").is_file() and from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    m = metrics(run)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6]
    assert all(k in m[-1] for k in ("loss", "loss_stage", "grad_norm", "lr", "images_per_s", "tflops"))
    assert [s for s, _ in C.list_checkpoints(run / "checkpoints")] == [6, 4]
    assert (run / "samples" / "step_0000006.png").is_file()
    st = final_state(run)
    assert st["step"] == 6 and st["config"]["model"]["depth"] == 2 and len(st["ranks"]) == 1


def _run_cli(rec, run, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "cdc", "train", str(rec), "--run-dir", str(run)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_sigkill_then_resume_matches_uninterrupted_run(shards, tmp_path):
    # with post-hoc EMA snapshots every 2 steps: those past the step-4 resume point are written again
    rec = write_recipe(tmp_path, recipe(shards, steps=14, ckpt_every=4, ema_snapshots=2))
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _run_cli(rec, full).wait(timeout=300) == 0
    p = _run_cli(rec, broken)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once step 6 is logged: after the step-4 checkpoint, before step 8
        if (broken / "metrics.jsonl").is_file() and any(x["step"] >= 6 for x in metrics(broken)):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert max(x["step"] for x in metrics(broken)) < 14
    assert _run_cli(rec, broken).wait(timeout=300) == 0
    a, b = metrics(full), metrics(broken)
    assert [x["step"] for x in b] == list(range(1, 15))  # lines past the checkpoint were replaced
    assert [x["loss"] for x in a] == [x["loss"] for x in b]  # step for step, bit for bit
    sa, sb = final_state(full), final_state(broken)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
        assert torch.equal(sa["ema"][k], sb["ema"][k]), k
    for pa, pb in zip(sa["posthoc_ema"]["profiles"], sb["posthoc_ema"]["profiles"], strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    snaps_a, snaps_b = PH.list_snapshots(full), PH.list_snapshots(broken)
    assert [s for s, _ in snaps_a] == [s for s, _ in snaps_b] == list(range(2, 15, 2))
    for (s, fa), (_, fb) in zip(snaps_a, snaps_b):
        for pa, pb in zip(PH.read_snapshot(fa).profiles, PH.read_snapshot(fb).profiles):
            assert all(torch.equal(pa[k], pb[k]) for k in pa), s


def test_sigterm_saves_a_checkpoint(shards, tmp_path):
    rec = write_recipe(tmp_path, recipe(shards, steps=100000, ckpt_every=100000))
    run = tmp_path / "run"
    p = _run_cli(rec, run)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and metrics(run)):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 143, out  # 128 + SIGTERM: `cdc train ... && cdc sample` stops here
    steps = [s for s, _ in C.list_checkpoints(run / "checkpoints")]
    assert len(steps) == 1 and steps[0] == final_state(run)["step"] > 0 and "stopped by signal" in out
    assert f"stopped by signal SIGTERM at step {steps[0]} of 100000; saved {run}/checkpoints/" in out


def test_ctrl_c_saves_exits_130_and_its_command_continues(shards, tmp_path):
    rec = write_recipe(tmp_path, recipe(shards, steps=100000, ckpt_every=100000))
    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "cdc", "train", str(rec), "--run-dir", str(run), "--set", "train.lr=0.002"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even if we ignore it
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and metrics(run)):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    st, path = C.load_latest(run / "checkpoints")
    step = st["step"]
    cmd = f"cdc train {rec} --run-dir {run} --set train.lr=0.002"
    line = f"stopped by signal SIGINT at step {step} of 100000; saved {path}; continue with: {cmd}"
    assert [ln for ln in err.splitlines() if "stopped" in ln] == [line]
    assert st["reason"] == "signal" and "run dir:" not in out
    last = metrics(run)[-1]
    assert last["step"] == step and last["stop"] == "SIGINT" and last["steps"] == 100000
    # the printed command continues from that checkpoint (here capped 3 steps later)
    again = [sys.executable, "-m", "cdc", *cmd.split()[1:], "--set", f"train.steps={step + 3}"]
    r = subprocess.run(again, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resumed from {path} at step {step}" in r.stdout, r.stderr[-2000:]
    assert final_state(run)["step"] == step + 3 and [x["step"] for x in metrics(run)] == list(range(1, step + 4))
    assert "stopped" not in r.stderr and "stop" not in metrics(run)[-1]



def test_time_limit_stop_exits_0_and_says_so(shards, tmp_path, one_thread):
    rec = write_recipe(tmp_path, recipe(shards, steps=12))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(run), "--set", "train.max_minutes=1e-6"])
    assert res.exit_code == 0, res.output  # the budget the user asked for is not a failure
    st, path = C.load_latest(run / "checkpoints")
    assert st["step"] == 1 and st["reason"] == "time_limit"  # the first check (log_every 1) is past 1e-6 min
    cmd = f"cdc train {rec} --run-dir {run} --set train.max_minutes=1e-6"
    lines = [ln for ln in res.stderr.splitlines() if "stopped" in ln]
    assert len(lines) == 1 and lines[0].startswith("stopped early at step 1 of 12 after ")
    assert lines[0].endswith(f" s (train.max_minutes); saved {path}; continue with: {cmd}")
    assert metrics(run)[-1]["stop"] == "time_limit" and f"run dir: {run} (step 1)" in res.stdout
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(run)])  # no cap: runs to the end
    assert res.exit_code == 0 and "stopped" not in res.stderr and final_state(run)["step"] == 12
    assert final_state(run)["reason"] == "end"


def test_corrupt_newest_checkpoint_falls_back(shards, tmp_path, capsys):

    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=8)), run, progress=False)
    newest = C.list_checkpoints(run / "checkpoints")[0][1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    out = train(from_dict(recipe(shards, steps=8)), run, progress=False)
    assert f"warning: {newest} is incomplete or corrupt" in capsys.readouterr().err
    assert out["step"] == 8 and C.verify(C.list_checkpoints(run / "checkpoints")[0][1])
    assert [x["step"] for x in metrics(run)] == list(range(1, 9))


def test_resume_past_a_corrupt_checkpoint_keeps_the_new_ones(shards, tmp_path, capsys):
    """With keep_last 1, the corrupt step-8 file must not outrank the checkpoints the resumed run
    writes below step 8 (here its step-6 end): it is moved aside, never deleted."""
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=8, ckpt_every=4, keep_last=10)), run, progress=False)
    bad = run / "checkpoints" / C.ckpt_name(8)
    body = bad.read_bytes()[:1000]
    bad.write_bytes(body)  # truncated: the resume falls back to step 4
    out = train(from_dict(recipe(shards, steps=6, ckpt_every=4, keep_last=1)), run, progress=False)
    assert f"warning: {bad} is incomplete or corrupt" in capsys.readouterr().err
    assert out["step"] == 6
    assert [s for s, _ in C.list_checkpoints(run / "checkpoints")] == [6]  # step 4 pruned, 6 kept
    assert C.verify(run / "checkpoints" / C.ckpt_name(6))
    aside = run / "checkpoints" / (C.ckpt_name(8) + ".corrupt")
    assert aside.read_bytes() == body and (run / "checkpoints" / (C.ckpt_name(8) + ".sha256.corrupt")).is_file()
    # and a later run continues from the good step 6
    assert train(from_dict(recipe(shards, steps=8, ckpt_every=4, keep_last=1)), run, progress=False)["step"] == 8
    assert [x["step"] for x in metrics(run)] == list(range(1, 9))


def test_torn_last_metrics_line_is_dropped_on_resume(shards, tmp_path):
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=4, ckpt_every=4)), run, progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a crash mid-append
    with pytest.warns(UserWarning, match="torn last line"):
        train(from_dict(recipe(shards, steps=6, ckpt_every=4)), run, progress=False)
    assert [x["step"] for x in metrics(run)] == list(range(1, 7))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        train(from_dict(recipe(shards, steps=8, ckpt_every=4)), run, progress=False)


def test_nonfinite_steps_are_skipped_then_stop_the_run(shards, tmp_path, monkeypatch):
    import cdc.train.loop as T

    real = T.loss
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] == 3 or calls["n"] >= 6:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(T, "loss", flaky)
    run = tmp_path / "run"
    with pytest.raises(T.NonFiniteError, match="non-finite"):
        T.train(from_dict(recipe(shards, steps=50, max_nonfinite=3)), run, progress=False)
    st = final_state(run)
    assert st["step"] == 4 and st["reason"] == "nonfinite" and st["nonfinite_total"] == 4
    assert all(torch.isfinite(v).all() for v in st["model"].values())


def test_skip_is_decided_on_device_whatever_the_check_interval(shards, tmp_path, monkeypatch):
    """The host learns of skipped steps only every check_every steps, yet the weights match a run
    that checks every step, and the stop rule still fires (a few attempts later)."""
    import cdc.train.loop as T

    real = T.loss

    def run(name, check_every):
        calls = {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            out = real(*a, **k)
            if calls["n"] in (3, 6) or calls["n"] >= 9:
                out.loss = out.loss * float("inf")
            return out

        monkeypatch.setattr(T, "loss", flaky)
        with pytest.raises(T.NonFiniteError):
            T.train(
                from_dict(recipe(shards, steps=50, max_nonfinite=3, log_every=100, check_every=check_every)),
                tmp_path / name,
                progress=False,
            )
        return final_state(tmp_path / name), calls["n"]

    (a, na), (b, nb) = run("every", 1), run("lazy", 7)
    assert a["step"] == b["step"] == 6 and a["nonfinite_total"] == 5 and na == 11
    assert nb >= na and b["nonfinite_total"] == nb - 6  # it noticed later, with the same state
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(float(sa[i]["step"]) == float(sb[i]["step"]) == 6 for i in sa)


def test_two_process_torchrun_gloo_stays_in_sync(shards, tmp_path):
    rec = write_recipe(tmp_path, recipe(shards, steps=4, ckpt_every=4))
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "cdc",
        "train",
        str(rec),
        "--run-dir",
        str(run),
    ]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    st = final_state(run)
    assert len(st["ranks"]) == 2 and st["step"] == 4
    assert st["ranks"][0]["param_checksum"] == st["ranks"][1]["param_checksum"]
    assert [r["data"]["rank"] for r in st["ranks"]] == [0, 1]  # each rank kept its own data position
    m = metrics(run)
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[-1]["images_per_s"] > 0


def test_signal_to_one_torchrun_rank_stops_every_rank_alike(shards, tmp_path):
    rec = write_recipe(tmp_path, recipe(shards, steps=100000, ckpt_every=100000))
    run = tmp_path / "ddp"
    # the two ranks as torchrun starts them, launched here so each one's exit code can be read
    # (torchrun itself reports the first failure and SIGTERMs the rest)
    world = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "cdc", "train", str(rec), "--run-dir", str(run)],
            env={**cli_env(), **world, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and metrics(run)):
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 learns of it at the next check
        (_, err0), (_, err1) = (p.communicate(timeout=120) for p in ranks)
    finally:  # a hang (ranks disagreeing) must not leave the job running
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [143, 143], err0[-2000:] + err1[-2000:]  # both save, exit alike
    st, path = C.load_latest(run / "checkpoints")
    assert st["reason"] == "signal" and len(st["ranks"]) == 2
    assert st["ranks"][0]["param_checksum"] == st["ranks"][1]["param_checksum"]
    cont = f"torchrun --nproc_per_node 2 -m cdc train {rec} --run-dir {run}"
    line = f"stopped by signal SIGTERM at step {st['step']} of 100000; saved {path}; continue with: {cont}"
    assert [ln for ln in err0.splitlines() if "stopped by" in ln] == [line]  # rank 0 says it, once
    assert "stopped by" not in err1


def test_bad_recipe_is_one_line_error(tmp_path, shards):
    raw = recipe(shards)
    raw["train"]["lrr"] = 1
    r = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path, raw))])
    assert r.exit_code == 2 and "train.lrr" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "recipe not found" in r.output
    r = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path, recipe(shards))), "--set", "model.heads=0"])
    assert r.exit_code == 2 and "model.heads must be >= 1" in r.output and len(r.output.strip().splitlines()) == 1


def test_dry_run_prints_config_and_params(tmp_path, shards):
    r = CliRunner().invoke(
        app, ["train", str(write_recipe(tmp_path, recipe(shards))), "--dry-run", "--set", "model.depth=3"]
    )
    assert r.exit_code == 0 and "depth: 3" in r.output and "# parameters:" in r.output
    assert not (Path("runs") / "r").exists()


def test_compile_on_torch_24_is_a_one_line_error(shards, tmp_path, monkeypatch):
    """torch 2.4's inductor fails on the packed trunk: say so before anything compiles."""
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    with pytest.raises(ConfigError, match=r"train.compile: torch 2.4.1\+cpu is older than 2.5; .* auto") as e:
        train(from_dict(recipe(shards, compile=True, steps=2)), tmp_path / "run", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_compile_without_a_cxx_compiler_is_a_one_line_error(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.7.1")  # on torch 2.4 (and 2.6 on CPU) the version is named first
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("cdc.nn.compiled_trunk.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.compile: inductor needs a C\+\+ compiler on CPU"):
        train(from_dict(recipe(shards, compile=True, steps=2)), tmp_path / "run", progress=False)


def test_why_not_compiled_names_what_is_missing(monkeypatch):
    from cdc.nn.compiled_trunk import why_not_compiled

    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert why_not_compiled("cpu") == "torch 2.6.0's CPU inductor mis-compiles the trunk (g++ rejects a generated kernel)"
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    monkeypatch.setattr("cdc.nn.compiled_trunk.importlib.util.find_spec", lambda name: None)
    assert why_not_compiled("cuda") == "inductor needs triton on CUDA (pip install triton)"
    monkeypatch.setattr("cdc.nn.compiled_trunk.shutil.which", lambda name: "/usr/bin/" + name if name == "cl++" else None)
    monkeypatch.delenv("CXX", raising=False)
    assert why_not_compiled("cpu") == "inductor needs a C++ compiler on CPU (e.g. apt-get install g++)"
    monkeypatch.setenv("CXX", "cl++")  # the compiler inductor is told to use, found on PATH
    assert why_not_compiled("cpu") is None


def _weights(run):
    return final_state(run)["model"]


def test_compile_auto_trains_eager_where_it_cannot_compile(shards, tmp_path, monkeypatch, capsys):
    """auto = eager, bit for bit, when the machine cannot compile (here: torch 2.4) or compiling fails."""
    train(from_dict(recipe(shards, steps=3)), tmp_path / "eager", progress=False)
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.4.1+cpu")
        train(from_dict(recipe(shards, compile="auto", steps=3)), tmp_path / "old", progress=False)
    assert "train.compile auto: training eager (torch 2.4.1+cpu is older than 2.5)" in capsys.readouterr().out

    def broken(self, *a, **k):  # what a broken toolchain looks like: the first compiled call raises
        raise RuntimeError("C++ compile error\nmore lines")

    monkeypatch.setattr("cdc.nn.model.DiT.warm_up_compiled", broken)
    monkeypatch.setattr("cdc.nn.compiled_trunk.why_not_compiled", lambda device: None)  # as on a machine that can
    monkeypatch.setattr("cdc.train.loop.why_not_compiled", lambda device: None)
    train(from_dict(recipe(shards, compile="auto", steps=3)), tmp_path / "broken", progress=False)
    out = capsys.readouterr().out
    assert "train.compile auto: the first compile failed, training eager (RuntimeError: C++ compile error)" in out
    ref = _weights(tmp_path / "eager")
    for run in ("old", "broken"):
        got = _weights(tmp_path / run)
        assert all(torch.equal(ref[k], got[k]) for k in ref), run
    with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):  # true: the error is the user's to see
        train(from_dict(recipe(shards, compile=True, steps=3)), tmp_path / "strict", progress=False)


@pytest.mark.parametrize("gamma", [0.0, 3.0, 8.0])
def test_ema_weight_left_on_the_init_is_the_product_of_decays(gamma):
    """Start the EMA at the init (1), then train to 0: after N steps the EMA is exactly the weight
    it keeps on the init, prod_n d_n. Power EMA (train.ema_gamma = g): d_n = (n/(n+1))^(g+1), so
    that product is (N+1)^-(g+1); the default warm-up: prod min(ema_decay, (1+n)/(10+n))."""
    import math

    from cdc.train.loop import ema_update

    cfg = from_dict({"train": {"ema_gamma": gamma, "ema_decay": 0.999}})
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    ema.weight.data.fill_(1.0)  # the trainer's EMA copy does not require grad either
    model.weight.data.fill_(0.0)
    N = 40
    for step in range(1, N + 1):
        ema_update(ema, model, step, cfg, keep=torch.tensor(True))
    want = (N + 1) ** -(gamma + 1) if gamma else math.prod(min(0.999, (1 + n) / (10 + n)) for n in range(1, N + 1))
    assert float(ema.weight) == pytest.approx(want, rel=1e-5)
    ema_update(ema, model, N + 1, cfg, keep=torch.tensor(False))  # a skipped step leaves it as is
    assert float(ema.weight) == pytest.approx(want, rel=1e-5)
