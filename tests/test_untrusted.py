"""Files from elsewhere never run a command: a pipe: shard URL needs the user's own opt-in (a flag or
the environment, never a recipe or --set alone), manifest shard names are plain file names, and
an oversized tar member is refused unread."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import smooth_image_tree
from typer.testing import CliRunner

from cdc.cli import app
from cdc.data.prepare import prepare
from cdc.data.shards import read_tar, resolve_shards
from cdc.fileio import BadFileError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = smooth_image_tree(tmp_path_factory.mktemp("src"), 4, [(24, 24)], (4, 4))
    out = tmp_path_factory.mktemp("shards")
    prepare(root, out, side=16, levels=2, shard_size=4, progress=False)
    return out


def recipe(tmp_path: Path, shards: str, name: str = "r.yaml") -> Path:
    raw = {
        "model": {"preset": "tiny", "in_channels": 3, "num_classes": 3, "patch": 4},
        "flow": {"sides": [8, 16]},
        "data": {"shards": shards, "workers": 0},
        "train": {"batch_size": 4, "steps": 2, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
                  "milestone_every": 0, "precision": "fp32"},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_pipe_needs_opt_in(shards, tmp_path, monkeypatch):
    monkeypatch.delenv("CDC_ALLOW_PIPE", raising=False)
    marker = tmp_path / "MARKER"
    pipe = f"pipe:touch {marker}; cat {shards}/train-{{000000..000002}}.tar"
    runner = CliRunner()
    for args in (
        [str(recipe(tmp_path, pipe, "pipe.yaml"))],  # from the recipe
        [str(recipe(tmp_path, str(shards))), "--set", f"data.shards={json.dumps(pipe)}"],  # from --set
    ):
        r = runner.invoke(app, ["train", *args, "--run-dir", str(tmp_path / "run")])
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1, r.output
        assert "--allow-pipe" in errors[0] and "CDC_ALLOW_PIPE=1" in errors[0] and "touch" in errors[0]
        assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()
    r = runner.invoke(app, ["train", str(recipe(tmp_path, pipe)), "--run-dir", str(tmp_path / "run"), "--allow-pipe"])
    monkeypatch.delenv("CDC_ALLOW_PIPE", raising=False)  # the flag set it for this process
    assert r.exit_code == 0, r.output
    assert marker.exists()  # the user allowed it: the command ran


@pytest.mark.parametrize("name", ["pipe:sh x.sh", "../x.tar", "/etc/passwd", "a/b.tar", ".hidden.tar", "a\\b.tar", "t\x07.tar"])
def test_manifest_shard_names_are_plain(shards, tmp_path, name):
    from servers import http_server

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["shards"][1]["name"] = name
    (bad / "manifest.json").write_text(json.dumps(m))
    for spec in (str(bad), str(bad / "manifest.json")):
        with pytest.raises(BadFileError, match="plain file names") as e:
            resolve_shards(spec)
        assert "\n" not in str(e.value)
    pytest.importorskip("aiohttp")
    with http_server(bad) as (url, _), pytest.raises(BadFileError, match="plain file names"):
        resolve_shards(url)


def _tar_with_big_member(path: Path, declared: int) -> None:
    """A tar whose second member's header declares `declared` bytes, followed by almost nothing:
    a reader that trusted the header would try to hold it all."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("k0.cls")
        info.size = 1
        t.addfile(info, io.BytesIO(b"0"))
    head = bytearray(buf.getvalue()[:1024])
    big = tarfile.TarInfo("k0.16.png")
    big.size = declared
    head += big.tobuf(tarfile.GNU_FORMAT) + bytes(4096)
    path.write_bytes(bytes(head))


def test_tar_member_cap(tmp_path):
    import cdc.data.reader as R

    shard = tmp_path / "train-000000.tar"
    _tar_with_big_member(shard, 3 << 30)  # 3 GiB declared in a 6 KB file
    with pytest.raises(BadFileError, match="declares 3072 MB") as e:
        list(read_tar(str(shard), 256 << 20))
    assert "data.max_member_mb" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadFileError, match="declares 3072 MB"):
        R.scan_tar(str(shard), 256 << 20)  # the index pass of shards without index.npy
    body = shard.read_bytes()[:2048]
    with pytest.raises(BadFileError, match="declares 3072 MB"):
        R.parse_sample(body, str(shard), 256 << 20)  # a sample read through an index


def test_no_secret_reaches_a_run_or_export_whose_shard_reads_fail(shards, tmp_path):
    """A token in the shard URL, HF_TOKEN and AWS_SECRET_ACCESS_KEY in the environment, a run with
    TensorBoard and offline W&B whose shard reads fail (a garbled sample skipped, then a run that
    stops on it), and an export: no byte of any secret in stderr or in any file written."""
    import subprocess
    import sys

    from conftest import subprocess_env
    from servers import http_server

    pytest.importorskip("aiohttp")
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    token, hf, aws = "urlTOKENx91ab", "hf_FAKEtoken1234567", "awsSECRETfake/0987654321"
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    victim = bad / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[600:1400] = bytes(800)  # a sample's image bytes garbled: its read fails
    victim.write_bytes(bytes(data))
    env = subprocess_env(HF_TOKEN=hf, AWS_SECRET_ACCESS_KEY=aws, WANDB_MODE="offline", WANDB_SILENT="true",
                         WANDB_DIR=str(tmp_path / "wb"), OMP_NUM_THREADS="1")
    (tmp_path / "wb").mkdir()
    outputs = []
    with http_server(bad) as (url, _):
        spec = url.replace("http://", f"http://user:{token}@")
        raw = yaml.safe_load(recipe(tmp_path, spec).read_text())
        raw["train"].update(steps=4, ckpt_every=2, log=["jsonl", "tensorboard", "wandb"])
        raw["data"]["skip_bad"] = True
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
        for run, extra in (("run", []), ("stops", ["--set", "data.skip_bad=false"])):
            p = subprocess.run([sys.executable, "-m", "cdc", "train", str(tmp_path / "r.yaml"), "--run-dir",
                                str(tmp_path / run), *extra], env=env, capture_output=True, timeout=300)
            outputs.append(p.stdout + p.stderr)
        assert p.returncode == 2 and b"error:" in p.stderr, p.stderr[-3000:]  # the second run stops on the bad sample
    assert b"warning: skipped" in outputs[0] and b"http://***@127.0.0.1" in outputs[1]  # the URL, masked
    p = subprocess.run([sys.executable, "-m", "cdc", "export", str(tmp_path / "run"), "--out", str(tmp_path / "export")],
                       env=env, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    outputs.append(p.stdout + p.stderr)
    written = [q for d in ("run", "stops", "export", "wb") for q in (tmp_path / d).rglob("*") if q.is_file()]
    assert any(q.name == "config.yaml" for q in written) and any(q.suffix == ".wandb" for q in written)
    assert any(q.name.startswith("events.out.tfevents") for q in written) and (tmp_path / "run" / ".lock").exists()
    for blob, where in [(o, "output") for o in outputs] + [(q.read_bytes(), str(q)) for q in written]:
        for secret in (token, hf, aws):
            assert secret.encode() not in blob, (secret, where)
