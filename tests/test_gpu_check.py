"""bin/gpu-check's CPU mode: the one-command GPU measurement cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_writes_every_figure(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
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
