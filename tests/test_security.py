"""Untrusted inputs and secrets: the redaction every error line, warning, saved config, checkpoint,
logger and export goes through; the run lock's file; bounded image decoding; the Inception hash."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cdc.config as config
import cdc.train.checkpoint as ckpt_lib
from cdc.redact import MASK, redact, redact_argv, redact_obj, redacted_yaml

URL_TOKEN = "urlTOKENx91ab"  # in https://user:TOKEN@host
HF = "hf_FAKEtoken1234567"
AWS = "awsSECRETfake/0987654321"
SECRETS = (URL_TOKEN, HF, AWS)
SHARDS = f"https://user:{URL_TOKEN}@data.example.com/x/{{000..001}}.tar"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS)


def _leaks(data: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in data]


def _tree_leaks(root: Path) -> dict[str, list[str]]:
    found = {str(p): _leaks(p.read_bytes()) for p in root.rglob("*") if p.is_file()}
    return {k: v for k, v in found.items() if v}


# ---------------------------------------------------------------------------------------------
# the redaction itself


def test_redact_known_answers():
    env = {"HF_TOKEN": "hf_abcdefgh", "MY_SERVICE_PASSWORD": "longpassword", "SHORT_KEY": "1", "HOME": "/home/u"}
    cases = {
        "https://user:pa55@host/x/{000..009}.tar": "https://***@host/x/{000..009}.tar",
        "s3://AKIA:secret@bucket/a@b.tar": "s3://***@bucket/a@b.tar",  # an @ in the path is not user-info
        "not found: https:/u:p@h/x.pt": "not found: https:/***@h/x.pt",  # a URL that went through Path
        "curl -H 'Authorization: Bearer abc.def' https://h/x": "curl -H 'Authorization: Bearer ***' https://h/x",
        "header authorization=Basic dXNlcjpwYXNz": "header authorization=Basic ***",
        "sent bearer eyJhbGciOi.x.y to the server": "sent bearer *** to the server",
        "https://b.s3.amazonaws.com/k.tar?X-Amz-Signature=abc123&X-Amz-Date=2025": (
            "https://b.s3.amazonaws.com/k.tar?X-Amz-Signature=***&X-Amz-Date=2025"
        ),
        "https://h/x.tar?token=t0k&access_token=a1&sig=zz&Signature=S": (
            "https://h/x.tar?token=***&access_token=***&sig=***&Signature=***"
        ),
        "failed: hf_abcdefgh rejected, login longpassword": "failed: *** rejected, login ***",
        "section.key=value, 1 shard, /home/u/data, max_tokens=5": "section.key=value, 1 shard, /home/u/data, max_tokens=5",
    }
    for text, want in cases.items():
        assert redact(text, env) == want, text


def test_redact_obj_and_argv(secret_env):
    cfg = {"data": {"shards": SHARDS, "batch": 3, "list": [f"x{HF}", ("t", AWS)]}, "flag": True}
    got = redact_obj(cfg)
    assert got == {"data": {"shards": "https://***@data.example.com/x/{000..001}.tar", "batch": 3,
                            "list": [f"x{MASK}", ("t", MASK)]}, "flag": True}  # fmt: skip
    assert cfg["data"]["shards"] == SHARDS  # a copy: the caller's config is untouched
    line = redact_argv(["cdc", "train", "r.yaml", "--set", "data.shards=/plain/path", "--set=train.init=x", "--run-dir", "r"])
    assert line == "cdc train r.yaml --set 'data.shards=***' '--set=train.init=***' --run-dir r"
    assert redacted_yaml(cfg).count(MASK) == 3 and not _leaks(redacted_yaml(cfg).encode())


# ---------------------------------------------------------------------------------------------
# every writer of a config, and every message


def _tiny_cfg_dict() -> dict:
    d = config.to_dict(
        config.from_dict(
            {"model": {"preset": "tiny", "in_channels": 1, "num_classes": 3, "patch": 2}, "flow": {"sides": [8, 16]}}
        )
    )
    d["data"]["shards"] = SHARDS
    d["train"]["init"] = f"/mnt/{HF}/{AWS}/run"  # env secrets in a value no pattern knows
    return d


def _tiny_state(d: dict) -> dict:
    from cdc.nn.model import build_model

    sd = build_model(config.from_dict(d)).state_dict()
    return {"config": d, "model": sd, "ema": sd, "step": 3}


def test_checkpoint_and_export_store_no_secret(secret_env, tmp_path):
    from cdc.train.export import export

    d = _tiny_cfg_dict()
    path = ckpt_lib.save(tmp_path / "run" / "checkpoints" / "step_0000003.pt", _tiny_state(d))
    assert not _leaks(path.read_bytes())
    stored = ckpt_lib.load(path)["config"]
    assert stored["data"]["shards"] == "https://***@data.example.com/x/{000..001}.tar"
    assert d["data"]["shards"] == SHARDS  # the caller's state is not changed
    # an export of a checkpoint that stored its config raw (written before redaction existed)
    old = tmp_path / "old" / "checkpoints" / "step_0000003.pt"
    old.parent.mkdir(parents=True)
    torch.save(_tiny_state(d), old)
    old.with_name(old.name + ".sha256").write_text(f"{ckpt_lib.sha256_file(old)}  {old.name}\n")
    assert _leaks(old.read_bytes())  # the test's premise: the secrets are there to leak
    meta = export(tmp_path / "old", tmp_path / "export")
    assert meta["data"]["shards"].startswith("https://***@")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]
    assert _tree_leaks(tmp_path / "export") == {}


def test_logger_configs_hold_no_secret(secret_env, tmp_path, monkeypatch):
    from cdc.train.loggers import TensorBoardLogger, WandbLogger, flat_config

    cfg = config.from_dict(_tiny_cfg_dict())
    flat = flat_config(cfg)
    assert flat["data.shards"] == "https://***@data.example.com/x/{000..001}.tar" and flat["model.patch"] == 2
    tb = TensorBoardLogger(tmp_path / "run", 0)
    tb.log_config(flat)
    tb.close()
    assert list((tmp_path / "run" / "tensorboard").iterdir()) and _tree_leaks(tmp_path / "run") == {}
    # W&B also records the command line: the --set value must not reach its files
    wandb = pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wb").mkdir()
    monkeypatch.setattr(sys, "argv", ["cdc", "train", "r.yaml", "--set", f"data.shards={SHARDS}"])
    try:
        wb = WandbLogger(tmp_path / "run", 0)
        wb.log_config(flat)
        wb.close()
    finally:
        wandb.teardown()
    assert sys.argv[-1] == f"data.shards={SHARDS}"  # restored after init
    files = [p for p in (tmp_path / "wb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert _tree_leaks(tmp_path / "wb") == {}


def test_messages_and_dry_run_hold_no_secret(secret_env, capsys):
    from cdc.fileio import bad_file, one_line, warn
    from cdc.train.loop import describe

    warn(f"skipped {SHARDS}: curl -H 'Authorization: Bearer {HF}' failed ({AWS})")
    assert not _leaks(capsys.readouterr().err.encode())
    assert not _leaks(one_line(RuntimeError(f"GET {SHARDS} failed\nwith {HF}")).encode())
    assert not _leaks(str(bad_file(SHARDS, "a tar shard", f"token {AWS}")).encode())
    out = describe(config.from_dict(_tiny_cfg_dict()), world=1)["config"]
    assert "https://***@data.example.com" in out and not _leaks(out.encode())


def test_cli_error_line_holds_no_secret(secret_env, tmp_path):
    from cdc.cli import app

    r = CliRunner().invoke(app, ["sample", "--ckpt", f"https://user:{URL_TOKEN}@h/{HF}/{AWS}.pt",
                                 "--out", str(tmp_path / "o")])  # fmt: skip
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "https:/***@h/" in lines[0] and not _leaks(r.output.encode())  # Path() ate a slash


# ---------------------------------------------------------------------------------------------
# the run lock


def test_run_lock_is_private_refuses_a_symlink_and_masks_set_values(secret_env, tmp_path, monkeypatch):
    from cdc.train.run_lock import LOCK_NAME, RunLock

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "cdc", "train", "r.yaml", "--set", f"data.shards={SHARDS}",
                                           "--set", "train.steps=9"], raising=False)  # fmt: skip
    lock = RunLock()
    assert lock.acquire(run) is None
    raw = (run / LOCK_NAME).read_bytes()
    assert stat.S_IMODE(os.stat(run / LOCK_NAME).st_mode) == 0o600
    assert json.loads(raw)["command"] == "python -m cdc train r.yaml --set 'data.shards=***' --set 'train.steps=***'"
    assert not _leaks(raw)
    lock.release()
    # a planted link: refused in one line, its target neither truncated nor written
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    other = tmp_path / "run2"
    other.mkdir()
    (other / LOCK_NAME).symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link") as e:
        RunLock().acquire(other)
    assert "\n" not in str(e.value) and target.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# the torch floor


def test_torch_floor_has_no_weights_only_advisory():
    """torch.load(weights_only=True) on torch <= 2.5.1 can run code (CVE-2025-32434): the declared
    floor and bin/test-matrix's lowest pair must both be past it, and agree."""
    import re

    root = Path(__file__).resolve().parents[1]
    deps = (root / "pyproject.toml").read_text()
    torch_floor = re.search(r'"torch>=([\d.]+)"', deps).group(1)
    vision_floor = re.search(r'"torchvision>=([\d.]+)"', deps).group(1)
    lowest = re.search(r'^LOWEST="([\d.]+):([\d.]+)"', (root / "bin" / "test-matrix").read_text(), re.M)
    assert tuple(map(int, torch_floor.split("."))) >= (2, 6)
    assert lowest.group(1).startswith(torch_floor) and lowest.group(2).startswith(vision_floor)


# ---------------------------------------------------------------------------------------------
# the Inception weights


def test_inception_weights_must_have_the_pinned_sha256(tmp_path, monkeypatch):
    import hashlib
    import io
    import urllib.request

    import cdc.eval.inception as I

    fake = tmp_path / I.WEIGHTS_NAME
    torch.save({"fc.weight": torch.zeros(2)}, fake)
    actual = hashlib.sha256(fake.read_bytes()).hexdigest()

    def never(*a, **k):
        raise AssertionError("an unchecked file reached torch.load")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ValueError) as e:
        I.load_inception(fake)
    msg = str(e.value)
    assert "\n" not in msg and str(fake) in msg and actual in msg and I.WEIGHTS_SHA256 in msg
    assert "delete the file" in msg and I.WEIGHTS_URL in msg
    # a download whose bytes differ is refused and not cached
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"a changed file"))
    with pytest.raises(ValueError, match=f"sha256 {hashlib.sha256(b'a changed file').hexdigest()}, expected"):
        I.load_inception()
    assert not any((tmp_path / "hub").rglob("*.pth*"))


# ---------------------------------------------------------------------------------------------
# bounded decoding


def _bomb_png(path: Path, side: int = 30000) -> None:
    """A valid-looking greyscale PNG declaring side x side pixels (900 MB decoded at 30000) whose
    file is a few KB: the header by hand, the pixel data a short run of zero rows."""
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * ((side + 1) * 64), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


BOMB_CHILD = r"""
import sys
from pathlib import Path
from typer.testing import CliRunner
from cdc.cli import app
from cdc.data.imageproc import load_image
import cdc.cli.score, cdc.eval.evalio, cdc.eval.reference  # torch alone is ~700 MB here: in the baseline

def status_mb(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) / 1024

# the peak from here on: VmHWM reset to the current size (ru_maxrss would also count the imports'
# transient peak and, through the exec, the forking pytest process's size)
Path("/proc/self/clear_refs").write_text("5")
base = status_mb("VmRSS")
d = Path(sys.argv[1])
img, notes, why = load_image(str(d / "src" / "b.png"), 64)  # prepare's decoding of one file
assert img is None and "declares 900,000,000 pixels, above the limit" in why, why
r = CliRunner().invoke(app, ["score", "ref", "--src", str(d / "src"), "--out", str(d / "ref.npz"), "--metrics", "swd"])
lines = [ln for ln in r.output.splitlines() if ln.strip()]
assert r.exit_code == 2 and len(lines) == 1 and "b.png" in lines[0] and "above the limit" in lines[0], r.output
# the training loader on a shard whose level image is the bomb
from cdc.config import from_dict
from cdc.data.loader import make_loader
from cdc.fileio import BadFileError
cfg = from_dict({"model": {"preset": "tiny", "num_classes": 1, "in_channels": 1}, "flow": {"sides": [16]},
                 "data": {"shards": str(d / "sh" / "train-000000.tar"), "workers": 0}, "train": {"batch_size": 1}})
try:
    next(iter(make_loader(cfg, cache_dir=d / "index")))
    raise AssertionError("the bomb was decoded")
except BadFileError as e:
    assert "train-000000.tar" in str(e) and "above the limit" in str(e) and "\n" not in str(e), e
print(status_mb("VmHWM") - base)
"""


def test_decompression_bomb_is_refused_in_bounded_memory(tmp_path):
    """prepare's decoding, `cdc score ref --src` and the training loader (the bomb as a shard's level)
    refuse a tiny PNG declaring 30000 x 30000 px from its header: within seconds and adding < 200 MB
    to the process's peak memory."""
    import io
    import subprocess
    import tarfile
    import time

    import numpy as np
    from conftest import subprocess_env
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(src / "a.png")
    _bomb_png(src / "b.png")
    assert (src / "b.png").stat().st_size < 10_000
    (tmp_path / "sh").mkdir()
    with tarfile.open(tmp_path / "sh" / "train-000000.tar", "w", format=tarfile.GNU_FORMAT) as t:
        for name, body in (("k0.cls", b"0"), ("k0.16.png", (src / "b.png").read_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(tmp_path)], capture_output=True, text=True,
                       env=subprocess_env(OMP_NUM_THREADS="1"), timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    added_mb = float(r.stdout.split()[-1])
    assert added_mb < 200, f"peak memory grew by {added_mb:.0f} MB"
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "ref.npz").exists()


def test_only_the_named_formats_open(tmp_path):
    from PIL import Image

    from cdc.data.imageproc import READ_FORMATS, ImageRefused, load_image, open_image

    eps = tmp_path / "x.png"  # EPS text in a .png: Pillow alone would hand it to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n")
    assert Image.open(eps).format == "EPS"  # the premise
    with pytest.raises(ImageRefused, match="not a recognised image format") as e:
        open_image(eps)
    assert str(eps) in str(e.value) and all(f in str(e.value) for f in READ_FORMATS)
    assert load_image(str(eps), 32)[2].startswith("not a recognised image format")
    ok = tmp_path / "ok.webp"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(ok)
    with open_image(ok.read_bytes(), "ok") as im:
        assert (im.format, im.size) == ("WEBP", (40, 30))
    with pytest.raises(ImageRefused, match=r"declares 40 x 30 = 1,200 pixels, above the limit of 1,000"):
        open_image(ok, max_pixels=1000)
