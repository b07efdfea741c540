"""Disk full (ENOSPC) or failing (EIO) while writing a checkpoint, a shard or samples (issue 30).

The fault is injected where the bytes go: `builtins.open` is patched so files opened for writing
under one folder draw from a small byte budget, and a write, flush or close past it fails with the
errno, as a full disk does (torch.save, numpy and PIL all write through such a file). One test also
fills a real tmpfs. Each writer must leave the previous good file byte-identical, no temp or partial
file behind, and stop with one line (exit 2 through the CLI) naming what failed and the folder to free.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import smooth_image_tree
from typer.testing import CliRunner

import cdc.config as config
import cdc.train.checkpoint as C
from cdc.cli import app
from cdc.data.prepare import prepare
from cdc.fileio import WriteFailedError, atomic_write_bytes
from cdc.sample.outdir import save_npz

CODES = [errno.ENOSPC, errno.EIO]
SAYS = {errno.ENOSPC: "no space left on device writing", errno.EIO: "I/O error writing"}


class _Limited:
    """A file opened for writing whose bytes come out of `disk.free`; past it, it fails like a full disk."""

    def __init__(self, real, disk: Disk):
        self.real, self.disk, self.charged = real, disk, 0

    def _charge(self, n: int) -> None:
        self.disk.free -= n
        self.charged += n
        if self.disk.free < 0:
            raise OSError(self.disk.code, os.strerror(self.disk.code))

    def write(self, b) -> int:
        n = len(memoryview(b).cast("B"))
        fit = max(0, min(n, self.disk.free))
        self.real.write(bytes(memoryview(b).cast("B")[:fit]))  # what fits lands, as on a real disk
        self._charge(n)
        return n

    def flush(self) -> None:
        self.real.flush()
        size = os.fstat(self.real.fileno()).st_size  # PIL's encoder writes to fileno() directly
        if size > self.charged:
            self._charge(size - self.charged)

    def close(self) -> None:
        try:
            if not self.real.closed:
                self.flush()
        finally:
            self.real.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self.real, name)


class Disk:
    """Files opened for writing under `root` (all of them, or those whose name contains `only`)
    share `free` bytes; past them every write fails with `code`."""

    def __init__(self, monkeypatch, root: Path, free: int, code: int = errno.ENOSPC, only: str = ""):
        self.root, self.free, self.code, self.only = str(root), free, code, only
        self.armed, self.snapshot = True, None
        real_open = builtins.open

        def fake_open(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
            hit = self.armed and any(c in mode for c in "wax+") and name.startswith(self.root)
            return _Limited(f, self) if hit and self.only in os.path.basename(name) else f

        monkeypatch.setattr(builtins, "open", fake_open)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(output: str) -> str:
    """The command's last line, its only `error:` line (a progress bar may come before, on \r lines)."""
    lines = output.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: ") and output.count("error:") == 1, output
    assert "Traceback" not in output
    return lines[-1]


def _state(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"config": {}, "model": {"w": torch.randn(n, generator=g)}, "step": seed}


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("code", CODES)
def test_checkpoint_write_fails_keeping_the_previous_one(tmp_path, monkeypatch, code):
    d = tmp_path / "run" / "checkpoints"
    C.save(d / C.ckpt_name(4), _state(1000, 4))
    before = files(d)
    disk = Disk(monkeypatch, d, free=2000, code=code)
    for step in (8, 4):  # a new step, and the same step rewritten (a good file under that name)
        with pytest.raises(WriteFailedError) as e:
            C.save(d / C.ckpt_name(step), _state(100_000, step))
        assert files(d) == before  # step 4 and its sidecar byte for byte; no temp, no step 8
        msg = str(e.value)
        assert e.value.errno == code and "\n" not in msg
        assert msg.startswith(f"{SAYS[code]} checkpoint {d / C.ckpt_name(step)}")
        if code == errno.ENOSPC:
            assert "needs about 400.0 KB" in msg  # 100k float32s
            assert f"free space in {d} (or write elsewhere) and run again" in msg
    disk.armed = False
    state, path = C.load_latest(d)
    assert path.name == C.ckpt_name(4) and torch.equal(state["model"]["w"], _state(1000, 4)["model"]["w"])


def test_a_checkpoint_whose_sidecar_cannot_be_written_is_removed(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    C.save(d / C.ckpt_name(4), _state(1000, 4))
    before = files(d)
    Disk(monkeypatch, d, free=0, only=".sha256")  # the .pt fits, its 80-byte sidecar does not
    with pytest.raises(WriteFailedError, match=r"checkpoint sidecar .*step_0000008\.pt\.sha256"):
        C.save(d / C.ckpt_name(8), _state(1000, 8))
    assert files(d) == before  # unverifiable without the sidecar: not left to be skipped at every resume


def test_cdc_train_stops_with_one_line_and_resumes_after_space_is_freed(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    prepare("fashion-mnist", shards, limit=64, shard_size=64, progress=False)
    raw = {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16, 32]},
        "data": {"shards": str(shards), "workers": 0, "shuffle": 16},
        "train": {"batch_size": 4, "steps": 8, "ckpt_every": 4, "log_every": 4, "sample_every": 0,
                  "precision": "fp32"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    args = ["train", str(tmp_path / "r.yaml"), "--run-dir", str(run)]
    d = run / "checkpoints"
    disk = Disk(monkeypatch, d, free=0, only=C.ckpt_name(8))  # step 4 fits, step 8 does not
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    line = one_error_line(r.output)
    assert f"no space left on device writing checkpoint {d / C.ckpt_name(8)}" in line
    assert f"free space in {d}" in line
    assert sorted(files(d)) == [C.ckpt_name(4), C.ckpt_name(4) + ".sha256"] and C.verify(d / C.ckpt_name(4))
    disk.armed = False  # space freed: the same command resumes from step 4 and finishes
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert [s for s, _ in C.list_checkpoints(d)] == [8, 4]


# ---------------------------------------------------------------------------------------------
# shards (cdc prepare)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return smooth_image_tree(tmp_path_factory.mktemp("tree"), 8, [(40, 40)], (5, 5), classes=3)


PREP = ["--side", "32", "--shard-size", "6", "--workers", "1"]


@pytest.mark.parametrize("code", CODES)
def test_prepare_disk_full_keeps_finished_shards_and_resumes_byte_identical(tree, tmp_path, monkeypatch, code):
    ref = tmp_path / "ref"
    assert CliRunner().invoke(app, ["prepare", "--src", str(tree), "--out", str(ref), *PREP]).exit_code == 0
    out = tmp_path / "out"
    shard_bytes = len((ref / "train-000000.tar").read_bytes())
    disk = Disk(monkeypatch, out, free=int(2.5 * shard_bytes), code=code)  # two shards fit, the third does not
    r = CliRunner().invoke(app, ["prepare", "--src", str(tree), "--out", str(out), *PREP])
    assert r.exit_code == 2, r.output
    line = one_error_line(r.output)
    assert line.startswith(f"error: {SAYS[code]} shard {out / 'train-000002.tar'}")
    if code == errno.ENOSPC:
        assert f"free space in {out} (or write elsewhere)" in line and "needs about" in line
    kept = files(out)
    assert not [n for n in kept if "partial" in n or ".tmp." in n]
    assert sorted(n for n in kept if n.endswith(".tar")) == ["train-000000.tar", "train-000001.tar"]
    for n in ("train-000000.tar", "train-000001.tar"):
        assert kept[n] == (ref / n).read_bytes()
    disk.armed = False  # space freed: the same command finishes what is missing
    assert CliRunner().invoke(app, ["prepare", "--src", str(tree), "--out", str(out), *PREP]).exit_code == 0
    got, want = files(out), files(ref)
    assert [n for n in got if n.endswith(".tar")] == [n for n in want if n.endswith(".tar")]
    assert all(got[n] == want[n] for n in want if n.endswith(".tar"))


def test_a_shard_rewritten_on_a_full_disk_stays_the_good_one(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["prepare", "--src", str(tree), "--out", str(out), *PREP]).exit_code == 0
    before = files(out)
    (out / ".prepare" / "train-000001.tar.json").unlink()  # its record lost: the shard is written again
    Disk(monkeypatch, out, free=100)
    r = CliRunner().invoke(app, ["prepare", "--src", str(tree), "--out", str(out), *PREP])
    assert r.exit_code == 2 and "writing shard" in one_error_line(r.output)
    after = files(out)
    assert after["train-000001.tar"] == before["train-000001.tar"]
    assert set(after) == set(before) - {".prepare/train-000001.tar.json"}


# ---------------------------------------------------------------------------------------------
# samples (cdc sample)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from cdc.nn.model import build_model

    cfg = config.from_dict(
        {"model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2}, "flow": {"sides": [8, 16, 32]}}
    )
    sd = build_model(cfg).state_dict()
    run = tmp_path_factory.mktemp("runs") / "tiny"
    C.save(run / "checkpoints" / C.ckpt_name(10), {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 10})
    return run


def _sample(ckpt: Path, out: Path, *extra: str):
    args = ["sample", "--ckpt", str(ckpt), "--out", str(out), "-n", "6", "--steps", "2", "--batch", "3"]
    return CliRunner().invoke(app, [*args, "--device", "cpu", *extra])


@pytest.mark.parametrize("code", CODES)
def test_sample_disk_full_keeps_finished_pngs_and_resumes_to_the_same_npz(ckpt, tmp_path, monkeypatch, code):
    assert _sample(ckpt, tmp_path / "ref").exit_code == 0
    out = tmp_path / "out"
    disk = Disk(monkeypatch, out / "images", free=0, code=code, only="000004.png")
    r = _sample(ckpt, out)
    assert r.exit_code == 2, r.output
    line = one_error_line(r.output)
    assert line.startswith(f"error: {SAYS[code]} image {out / 'images' / '000004.png'}")
    assert line.endswith("run again with --resume (finished images are kept)")
    if code == errno.ENOSPC:
        assert f"free space in {out / 'images'} (or write elsewhere)" in line
    kept = files(out / "images")
    assert sorted(kept) == [f"{i:06d}.png" for i in (0, 1, 2, 3, 5)]  # no temp file, no image 4
    ref = files(tmp_path / "ref" / "images")
    assert all(kept[n] == ref[n] for n in kept)
    disk.armed = False
    assert _sample(ckpt, out, "--resume").exit_code == 0
    assert (out / "samples.npz").read_bytes() == (tmp_path / "ref" / "samples.npz").read_bytes()


def test_samples_npz_rewritten_on_a_full_disk_stays_the_good_one(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _sample(ckpt, out).exit_code == 0
    before = files(out)
    Disk(monkeypatch, out, free=1000, only="samples.npz")
    r = _sample(ckpt, out, "--resume")  # every image done: only the npz and figures are written again
    assert r.exit_code == 2, r.output
    line = one_error_line(r.output)
    assert f"no space left on device writing npz {out / 'samples.npz'} (needs about 6.2 KB" in line  # 6x32x32 + 6x8
    after = files(out)
    assert after["samples.npz"] == before["samples.npz"] and not [n for n in after if ".tmp." in n]


# ---------------------------------------------------------------------------------------------
# a real full disk: a 256 KB tmpfs (needs root, or CAP_SYS_ADMIN)


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or 'not permitted'})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_tmpfs(tmpfs, tree):
    d = tmpfs / "checkpoints"
    C.save(d / C.ckpt_name(4), _state(1000, 4))  # 4 KB of weights fit
    before = files(d)
    with pytest.raises(WriteFailedError, match=rf"^no space left on device writing checkpoint {d}/step_0000008\.pt "
                                               r"\(needs about 400\.0 KB, [\d.]+ KB free\).* free space in "):
        C.save(d / C.ckpt_name(8), _state(100_000, 8))  # torch hides ENOSPC in a RuntimeError: found anyway
    assert files(d) == before

    npz = tmpfs / "samples.npz"
    save_npz(npz, {"arr_0": ((2, 8, 8, 1), np.uint8, [np.zeros((2, 8, 8, 1), np.uint8)])})
    good = npz.read_bytes()
    noise = np.random.default_rng(0).integers(0, 255, (300_000,), dtype=np.uint8)  # incompressible, > 256 KB
    with pytest.raises(WriteFailedError, match="no space left on device writing npz"):
        save_npz(npz, {"arr_0": (noise.shape, np.uint8, [noise])})
    assert npz.read_bytes() == good

    with pytest.raises(WriteFailedError, match="no space left on device writing file"):
        atomic_write_bytes(tmpfs / "big.bin", noise.tobytes())

    out = tmpfs / "shards"
    r = CliRunner().invoke(app, ["prepare", "--src", str(tree), "--out", str(out), "--side", "64", "--shard-size", "6",
                                 "--workers", "1", "--store", "png"])
    assert r.exit_code == 2 and f"no space left on device writing shard {out}/" in one_error_line(r.output)
    assert set(os.listdir(tmpfs)) == {"checkpoints", "samples.npz", "shards"}
    assert not [p for p in out.rglob("*") if "partial" in p.name or ".tmp." in p.name]
    assert all(p.stat().st_size > 0 for p in out.glob("*.tar"))
