"""Exports that work on another machine: the run's autoguide bundled under guide/, every file but
the card covered by SHA256SUMS, and `cdc train --init EXPORT_DIR`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cdc.config as config
import cdc.train.checkpoint as ckpt_lib
from cdc import load
from cdc.cli import app
from cdc.fileio import BadFileError
from cdc.train.export import export

SIDES = [8, 16, 32]
ASK = dict(classes=[3, 7], n=4, steps=2, cfg=2.0, seed=3)


def _weights(seed: int) -> tuple[dict, dict]:
    """(config, weights) of a tiny model whose zero-initialised layers got random values."""
    from cdc.nn.model import build_model

    raw = {"model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2}, "flow": {"sides": SIDES},
           "data": {"shards": "/nonexistent/shards"}}  # fmt: skip
    model = build_model(config.from_dict(raw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return raw, model.state_dict()


def _ckpt(path: Path, seed: int, step: int, guide: str = "") -> Path:
    raw, w = _weights(seed)
    cfg = config.from_dict({**raw, "sample": {"guide": guide, "guide_scale": [2.0] if guide else [1.0]}})
    return ckpt_lib.save(path, {"config": config.to_dict(cfg), "model": w, "ema": w, "step": step})


@pytest.mark.parametrize("kind", ["file", "step"])
def test_the_runs_guide_is_bundled_and_samples_without_its_file(tmp_path, kind):
    run = tmp_path / "run"
    if kind == "file":  # a weaker checkpoint elsewhere on this machine
        guide_file = _ckpt(tmp_path / "guides" / "weak.pt", seed=1, step=3)
        spec = str(guide_file)
    else:  # the run's own earlier checkpoint
        guide_file = _ckpt(run / "checkpoints" / ckpt_lib.ckpt_name(5), seed=1, step=5)
        spec = "step:5"
    _ckpt(run / "checkpoints" / ckpt_lib.ckpt_name(10), seed=0, step=10, guide=spec)
    want = load(run, device="cpu").sample(**ASK)
    assert not torch.equal(want, load(run, device="cpu").sample(**ASK, guide="none"))  # the guide matters
    meta = export(run, tmp_path / "exp")
    assert meta["sample"]["guide"] == "guide" and meta["export"]["guide"]["step"] == (3 if kind == "file" else 5)
    # another machine: neither the guide file nor the run, and the folder under another name
    guide_file.rename(guide_file.with_name("gone"))
    shutil.rmtree(run)
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(tmp_path / "exp", moved)
    assert sorted(p.name for p in (moved / "guide").iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors"]
    assert "guide/SHA256SUMS" in (moved / "SHA256SUMS").read_text()
    assert torch.equal(load(moved, device="cpu").sample(**ASK), want)
    assert torch.equal(load(moved, device="cpu").sample(**ASK, guide="none"),
                       load(moved / "guide" / ".." / "model.safetensors", device="cpu").sample(**ASK, guide="none"))  # fmt: skip


def test_a_guide_that_is_gone_is_dropped_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    _ckpt(run / "checkpoints" / ckpt_lib.ckpt_name(10), seed=0, step=10, guide=str(tmp_path / "nowhere.pt"))
    meta = export(run, tmp_path / "exp")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("note: ") and "nowhere.pt" in err[0] and "CFG alone" in err[0]
    assert meta["sample"]["guide"] == "" and meta["export"]["guide_dropped"] == str(tmp_path / "nowhere.pt")
    assert not (tmp_path / "exp" / "guide").exists()
    load(tmp_path / "exp", device="cpu").sample(n=1, steps=1)


@pytest.fixture(scope="module")
def guided_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guided")
    guide = _ckpt(root / "weak.pt", seed=1, step=3)
    _ckpt(root / "run" / "checkpoints" / ckpt_lib.ckpt_name(10), seed=0, step=10, guide=str(guide))
    export(root / "run", root / "exp")
    return root / "exp"


def _sample_error(folder: Path, tmp_path: Path) -> str:
    r = CliRunner().invoke(app, ["sample", "--ckpt", str(folder), "--out", str(tmp_path / "s"), "-n", "1",
                                 "--steps", "1", "--device", "cpu"])  # fmt: skip
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not (tmp_path / "s").exists()  # refused before any output
    return lines[0]


def test_a_changed_config_json_is_a_one_line_error(guided_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(guided_export, bad)
    meta = json.loads((bad / "config.json").read_text())
    meta["sample"]["steps"] = [7]  # still a valid config: only the hash tells
    (bad / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    line = _sample_error(bad, tmp_path)
    assert str(bad / "config.json") in line and "SHA256SUMS" in line and "export again" in line


@pytest.mark.parametrize("victim", ["guide/model.safetensors", "guide/config.json", "guide/SHA256SUMS", "SHA256SUMS"])
def test_a_changed_guide_or_sums_file_is_refused(guided_export, tmp_path, victim):
    bad = tmp_path / "bad"
    shutil.copytree(guided_export, bad)
    f = bad / victim
    if victim == "SHA256SUMS":
        f.unlink()
    elif victim.endswith(".json"):  # valid JSON and config: only the hash tells
        f.write_text(f.read_text().replace('"cfg": [', '"cfg": [1.5, ', 1))
    else:
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01
        f.write_bytes(bytes(data))
    # guide/*: the guide's own SHA256SUMS catches it when sampling loads the guide;
    # guide/SHA256SUMS: the export's SHA256SUMS when loading the model
    with pytest.raises((BadFileError, FileNotFoundError), match="sha256|not found") as e:
        load(bad, device="cpu").sample(n=1, steps=1)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_an_export_without_sums_of_the_first_format_still_loads(tmp_path):
    _ckpt(tmp_path / "run" / "checkpoints" / ckpt_lib.ckpt_name(10), seed=0, step=10)
    export(tmp_path / "run", tmp_path / "exp")
    want = load(tmp_path / "exp", device="cpu").sample(**ASK)
    meta = json.loads((tmp_path / "exp" / "config.json").read_text())
    (tmp_path / "exp" / "config.json").write_text(json.dumps({**meta, "format": "cdc-export/1"}))
    (tmp_path / "exp" / "SHA256SUMS").unlink()
    assert torch.equal(load(tmp_path / "exp", device="cpu").sample(**ASK), want)


def test_train_init_from_an_export(tmp_path):
    """A downloaded model fine-tuned: --init EXPORT_DIR starts from the export's weights (its
    config.json gives the network); with the trunk frozen, 2 steps leave its blocks as exported."""
    import yaml
    from safetensors.torch import load_file

    from cdc.data.prepare import prepare
    from cdc.nn.model import build_model
    from cdc.train.init_from import start_from_init

    shards = tmp_path / "shards"
    prepare("fashion-mnist", shards, limit=64, shard_size=64, progress=False)
    raw = {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16]},
        "data": {"shards": str(shards), "workers": 0},
        "train": dict(batch_size=8, steps=2, lr=1e-3, log_every=1, ckpt_every=2, sample_every=0,
                      precision="fp32", init_trunk_lr=0.0),
        "sample": {"steps": 2, "cfg": 2.0},
    }  # fmt: skip
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(raw))
    src = tmp_path / "src"
    _train(["train", str(rec), "--run-dir", str(src), "--set", "train.init_trunk_lr=1.0"])
    export(src, tmp_path / "exp")
    shutil.rmtree(src)  # only the export remains
    want = load_file(str(tmp_path / "exp" / "model.safetensors"))
    _train(["train", str(rec), "--run-dir", str(tmp_path / "ft"), "--init", str(tmp_path / "exp")])
    cfg = config.from_dict(yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text()))
    assert cfg.train.init == str((tmp_path / "exp" / "model.safetensors").resolve())  # pinned for resume
    model = build_model(cfg)
    start_from_init(model, cfg, torch.device("cpu"))  # the fine-tune's step-0 weights
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    trained = ckpt_lib.load(tmp_path / "ft" / "checkpoints" / ckpt_lib.ckpt_name(2))
    blocks = [k for k in want if k.startswith("blocks.")]
    assert trained["step"] == 2 and blocks and all(torch.equal(trained["model"][k], want[k]) for k in blocks)
    assert not torch.equal(trained["model"]["final.adaLN.1.weight"], want["final.adaLN.1.weight"])


def _train(args: list[str]) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
