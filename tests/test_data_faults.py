"""A shard cut short or a sample that cannot be decoded, met during training (issue 30): a one-line
error naming the shard and the sample, or with data.skip_bad a warning and a count; never a
silently wrong batch, and exact resume either way."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import smooth_image_tree, take

from cdc.config import from_dict
from cdc.data.loader import make_loader
from cdc.data.prepare import prepare
from cdc.fileio import BadFileError, one_line


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """24 RGB images in 3 classes as 6 shards of 4 (centre squares, levels 20/10)."""
    root = smooth_image_tree(tmp_path_factory.mktemp("src"), 8, [(24, 24)], (4, 4))
    out = tmp_path_factory.mktemp("shards")
    prepare(root, out, side=16, expand=1.25, levels=2, shard_size=4, progress=False, crop="center")
    return out


def config(shards: Path, **data) -> object:
    return from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 3, "in_channels": 3},
            "flow": {"sides": [8, 16]},
            "data": {"shards": str(shards), "workers": 0, "shuffle": 4, **data},
            "train": {"batch_size": 4},
        }
    )


def copy_with(good: Path, tmp: Path, shard: str, how: str) -> tuple[Path, str]:
    """A copy of the shards with `shard` cut short ("cut") or one sample's image bytes garbled
    ("garble", the tar stays valid); returns (folder, the key of the sample hit)."""
    out = tmp / how
    shutil.copytree(good, out)
    path = out / shard
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t if m.isfile()]
    key = members[3][0].name.split(".")[0]  # second sample (members: cls + 2 levels each)
    if how == "cut":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2 + 100])  # inside a later sample's member
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            for m, body in members:
                if m.name.startswith(key + ".") and not m.name.endswith(".cls"):
                    body = bytes(range(256)) * (len(body) // 256) + b"\0" * (len(body) % 256)
                t.addfile(m, io.BytesIO(body))
        path.write_bytes(buf.getvalue())
    return out, key


def every_key(loader, n: int) -> list[str]:
    return [k for b in take(loader, n) for ks in b.meta["keys"] for k in ks]


@pytest.mark.parametrize("how", ["cut", "garble"])
def test_a_bad_shard_is_one_line_naming_shard_and_sample(good, tmp_path, how):
    bad, key = copy_with(good, tmp_path, "train-000002.tar", how)
    with pytest.raises(BadFileError) as e:
        take(make_loader(config(bad), seed=0), 12)  # two epochs: every shard is read
    msg = one_line(e.value)
    assert "\n" not in str(e.value) and "train-000002.tar" in msg and "data.skip_bad" in msg
    assert ("cut short before byte" in msg) if how == "cut" else (f"sample {key}" in msg)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["cut", "garble"])
def test_skip_bad_skips_counts_and_resumes_exactly(good, tmp_path, how, workers, capfd):
    bad, key = copy_with(good, tmp_path, "train-000002.tar", how)
    cfg = config(bad, skip_bad=True, workers=workers)
    ref_loader = make_loader(cfg, seed=0)
    ref = take(ref_loader, 12)  # 48 samples drawn from 23 (garble) or fewer (cut) per epoch
    assert all(b.size == 4 for b in ref)  # full batches: the bad sample was replaced, not dropped
    keys = [k for b in ref for ks in b.meta["keys"] for k in ks]
    if how == "garble":
        assert key not in keys
    else:
        good_keys = every_key(make_loader(config(good, workers=workers), seed=0), 12)
        assert len(set(keys)) < len(set(good_keys))
    skipped = ref[-1].meta["skipped"]
    assert skipped >= 2  # once per epoch, and the count reaches every batch's meta
    assert "warning: skipped" in capfd.readouterr().err
    loader = make_loader(cfg, seed=0)
    part = take(loader, 5)
    loader2 = make_loader(cfg, seed=0)
    loader2.load_state_dict(loader.state_dict())
    rest = take(loader2, 7)
    for a, b in zip(ref, part + rest, strict=True):
        assert a.meta["keys"] == b.meta["keys"]
        assert all(torch.equal(x, y) for x, y in zip(a.x1, b.x1, strict=True))
    assert rest[-1].meta["skipped"] == skipped


def train_cli(shards: Path, tmp_path: Path, workers: int, **data):
    import yaml
    from typer.testing import CliRunner

    from cdc.cli import app

    raw = {
        "model": {"preset": "tiny", "in_channels": 3, "num_classes": 3, "patch": 4},
        "flow": {"sides": [8, 16]},
        "data": {"shards": str(shards), "workers": workers, "shuffle": 4, **data},
        "train": {"batch_size": 4, "steps": 12, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
                  "milestone_every": 0, "precision": "fp32"},
    }
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("workers", [0, 2])
def test_cdc_train_on_a_garbled_shard_is_one_line_and_exit_2(good, tmp_path, workers):
    """Through the CLI, also when the error is raised inside a DataLoader worker process."""
    bad, key = copy_with(good, tmp_path, "train-000002.tar", "garble")
    r = train_cli(bad, tmp_path, workers)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "train-000002.tar" in errors[0] and f"sample {key}" in errors[0]


def test_skipped_samples_reach_metrics(good, tmp_path):
    import json

    bad, key = copy_with(good, tmp_path, "train-000002.tar", "garble")
    r = train_cli(bad, tmp_path, 0, skip_bad=True)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [x["data_skipped"] for x in lines]
    assert counts == sorted(counts) and counts[-1] == 2  # 12 steps x 4 = two epochs of 24, one bad each
