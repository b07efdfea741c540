"""bin/gpu-check's CPU mode: the one-command GPU measurement cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_writes_every_figure(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = subprocess_env(OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "gpu-check"), "--cpu", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu" and res["versions"]["torch"]
    assert all(e["status"] == "ok" for e in res["log"]), res["log"]
    assert res["tests"]["status"] == "ok" and "skipped" in res["tests"]["summary"]  # gpu tests skip on CPU
    assert res["matmul_peak"]["tflops"] > 0
    (row,) = res["train"]
    assert row["preset"] == "tiny" and row["samples_per_s"] > 0 and 0 < row["mfu"]
    assert set(res["sample"]) == {"1x4x2", "2x4x2"}
    assert res["sample"]["2x4x2"]["nfe_per_image"] == 2 * res["sample"]["1x4x2"]["nfe_per_image"]
    assert all(r["sec_per_image"] > 0 for r in res["sample"].values())
    assert res["loader"]["loader_images_per_s"] > 0 and res["loader"]["prepare_images_per_s"] > 0
    # Fig. 2: the recipe's chain stopped at 64..512 px, 1 step per stage, CFG x2 -> 2 NFE per stage
    rows = res["resolution"]["curves"]["prefix"]
    assert [c["side"] for c in rows] == [64, 128, 256, 512] and [c["nfe"] for c in rows] == [2, 4, 6, 8]
    assert rows[-1]["stage_sides"] == [64, 128, 256, 512] and all(c["sec_per_image"] > 0 for c in rows)
    assert all(c["us_per_pixel"] == c["sec_per_image"] / c["side"] ** 2 * 1e6 for c in rows)
    # every gpu-marked test is named with its outcome (a timeout keeps the finished ones)
    assert res["tests"]["passed"] == 0 and "test_exact_resume_on_cuda[False]" in res["tests"]["skipped"]


def _load_script():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "bin" / "gpu-check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_test_outcomes_from_a_cut_off_pytest_run():
    out = _load_script()._test_outcomes(
        "tests/test_gpu.py::test_a[x] PASSED   [ 10%]\n"
        "tests/test_gpu.py::test_b FAILED   [ 20%]\n"
        "tests/test_gpu.py::test_c[sdpa-dtype1] PASSED   [ 30%]\n"
        "tests/test_gpu.py::test_d "  # running when the timeout hit: no outcome yet
    )
    assert out == {"passed": ["test_a[x]", "test_c[sdpa-dtype1]"], "failed": ["test_b"]}


def test_steps_that_cannot_finish_in_the_budget_are_skipped():
    g = _load_script()
    r = g.Runner(budget_s=10.0, env=dict(os.environ))
    r.t0 = __import__("time").time()  # 10 s left: less than a step's 30 s minimum
    assert r.json_cmd("bench", [sys.executable, "-c", "print('{}')"], timeout=60) is None
    assert r.log == [{"step": "bench", "status": "skipped (budget)"}]
    got = r.json_cmd("quick", [sys.executable, "-c", "print('{\"a\": 1}')"], timeout=60, min_s=1)
    assert got == {"a": 1} and r.log[-1]["status"] == "ok"
