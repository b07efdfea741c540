"""Every command meets files that are not what they claim with one line, exit code 2, no traceback.

Each case builds one bad file (random bytes, the wrong kind of valid file, a truncated one) where a
command expects a checkpoint, recipe, npz, reference, shard or state file, and checks that the
command names the file and what it expected. Plus: `cdc prepare` survives file names that are not
UTF-8 (legal on Linux) and records them losslessly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cdc import config
from cdc.cli import app
from cdc.data.prepare import prepare
from cdc.train import checkpoint as ckpt_lib

JUNK = bytes(range(256)) * 4 + b"\xff\xfe not a real file \x00\x01"


def _invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(r, *needles: str) -> None:
    """Exit 2; the output ends with one `error: ...` line (a progress bar may precede it); no traceback."""
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}{r.exception!r}"
    assert "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.output
    out = errors[0]
    for n in needles:
        assert n in out, f"{n!r} not in {out!r}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad") / "shards"
    prepare("fashion-mnist", out, limit=64, shard_size=32, progress=False)
    return out


def _tiny_cfg() -> dict:
    return {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16, 32]},
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from cdc.nn.model import build_model

    cfg = config.from_dict(_tiny_cfg())
    sd = build_model(cfg).state_dict()
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "step_0000001.pt"
    ckpt_lib.save(path, {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 1})
    return path


def _recipe(tmp_path: Path, shards: Path, **data) -> Path:
    raw = _tiny_cfg()
    raw["data"] = {"shards": str(shards), "workers": 0, "shuffle": 8, **data}
    raw["train"] = {"batch_size": 4, "steps": 2, "log_every": 1, "ckpt_every": 0, "sample_every": 0,
                    "precision": "fp32"}  # fmt: skip
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


# ----------------------------------------------------------------------------- prepare


def _class_tree(root: Path, names_per_class: dict[str, list[bytes]]) -> Path:
    rng = np.random.default_rng(0)
    for cls, names in names_per_class.items():
        d = os.path.join(os.fsencode(root), cls.encode())
        os.makedirs(d, exist_ok=True)
        for name in names:
            buf = Path(os.fsdecode(os.path.join(d, b"tmp.png")))
            Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(buf)
            os.rename(os.fsencode(buf), os.path.join(d, name))
    return root


def test_prepare_survives_non_utf8_file_names(tmp_path):
    bad = b"img\xff\xfe1.png"  # latin-1 bytes: legal on Linux, not UTF-8
    src = _class_tree(tmp_path / "src", {"a": [b"img0.png", bad], "b": [b"img0.png"]})
    out = tmp_path / "out"
    r = _invoke(["prepare", "--src", src, "--out", out, "--side", "16", "--levels", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))  # strict UTF-8 JSON
    assert m["count"] == 3 and not m["skipped"]
    (entry,) = m["escaped_names"]
    # lossless: the raw bytes come back from the hex field, and the display form is readable
    assert bytes.fromhex(entry["path_hex"]) == b"a/" + bad
    assert entry["path"] == "a/img\\xff\\xfe1.png"
    from cdc.data.loader import read_tar

    keys = [key for sh in sorted(out.glob("*.tar")) for key, _ in read_tar(str(sh))]
    assert entry["key"] in keys and all(k.isascii() and "." not in k for k in keys)
    # a re-run resumes instead of tripping over the name
    r = _invoke(["prepare", "--src", src, "--out", out, "--side", "16", "--levels", "2"])
    assert r.exit_code == 0, r.output


def test_prepare_non_utf8_class_folder_and_skipped_file(tmp_path):
    src = _class_tree(tmp_path / "src", {"a": [b"x.png"]})
    os.makedirs(os.path.join(os.fsencode(src), b"cl\xe9"))
    with open(os.path.join(os.fsencode(src), b"cl\xe9", b"bro\xffken.jpg"), "wb") as f:
        f.write(JUNK)
    out = tmp_path / "out"
    r = _invoke(["prepare", "--src", src, "--out", out, "--side", "16", "--levels", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["classes"] == ["a", "cl\\xe9"] and m["count"] == 1
    (skip,) = m["skipped"]
    assert bytes.fromhex(skip["path_hex"]) == b"cl\xe9/bro\xffken.jpg"


def test_prepare_bad_idx_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(JUNK)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(JUNK)
    r = _invoke(["prepare", "--src", tmp_path, "--out", tmp_path / "out"])
    assert_one_line_error(r, "train-images-idx3-ubyte", "idx")


def test_prepare_corrupt_resume_state(tmp_path, shards):
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    (out / ".prepare" / "args.json").write_bytes(JUNK)
    r = _invoke(["prepare", "--src", "fashion-mnist", "--out", out, "--limit", "64", "--shard-size", "32"])
    assert_one_line_error(r, "args.json")


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "body, needle", [(JUNK, "not valid YAML"), (b"- just\n- a list\n", "mapping"), (b"model: [1, 2\n", "YAML")]
)
def test_train_bad_recipe(tmp_path, body, needle):
    p = tmp_path / "r.yaml"
    p.write_bytes(body)
    assert_one_line_error(_invoke(["train", p]), "r.yaml", needle)


def test_train_bad_manifest(tmp_path, shards):
    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    (d / "manifest.json").write_bytes(JUNK)
    r = _invoke(["train", _recipe(tmp_path, d), "--run-dir", tmp_path / "run"])
    assert_one_line_error(r, "manifest.json", "cdc prepare")


def test_train_bad_shard(tmp_path, shards):
    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    first = sorted(d.glob("*.tar"))[0]
    first.write_bytes(JUNK)
    r = _invoke(["train", _recipe(tmp_path, d), "--run-dir", tmp_path / "run"])
    assert_one_line_error(r, first.name, "shard")


def test_train_bad_run_config(tmp_path, shards):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(JUNK)
    r = _invoke(["train", _recipe(tmp_path, shards), "--run-dir", run])
    assert_one_line_error(r, "config.yaml")


def test_train_refuses_a_run_whose_checkpoints_are_all_bad(tmp_path, shards):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "step_0000100.pt").write_bytes(JUNK)
    r = _invoke(["train", _recipe(tmp_path, shards), "--run-dir", tmp_path / "run"])
    assert_one_line_error(r, "none verifies")
    assert "\nwarning: " + str(ck / "step_0000100.pt") + " is incomplete or corrupt" in "\n" + r.output
    assert [p.name for p in ck.iterdir()] == ["step_0000100.pt"]  # nothing written, nothing pruned


# ----------------------------------------------------------------------------- sample


def _bad_checkpoints(tmp_path: Path, ckpt: Path) -> dict[str, Path]:
    files = {}
    files["junk"] = tmp_path / "junk.pt"
    files["junk"].write_bytes(JUNK)
    files["text"] = tmp_path / "recipe.yaml"
    files["text"].write_text("model:\n  preset: tiny\n")
    files["not_cdc"] = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, files["not_cdc"])
    files["list"] = tmp_path / "list.pt"
    torch.save([1, 2, 3], files["list"])
    state = ckpt_lib.load(ckpt)
    state["model"] = state["ema"] = {"blocks.0.nonsense": torch.zeros(2)}
    files["mismatch"] = tmp_path / "mismatch.pt"
    torch.save(state, files["mismatch"])
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(ckpt.read_bytes()[:1000])
    state = ckpt_lib.load(ckpt)
    state["config"] = {"model": {"preset": "nope"}}
    files["bad_config"] = tmp_path / "bad_config.pt"
    torch.save(state, files["bad_config"])
    return files


@pytest.mark.parametrize("kind", ["junk", "text", "not_cdc", "list", "mismatch", "truncated", "bad_config"])
def test_sample_bad_checkpoint(tmp_path, ckpt, kind):
    f = _bad_checkpoints(tmp_path, ckpt)[kind]
    r = _invoke(["sample", "--ckpt", f, "--out", tmp_path / "s", "-n", "2", "--steps", "1", "--device", "cpu"])
    assert_one_line_error(r, f.name)
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_sample_bad_resume_state(tmp_path, ckpt):
    out = tmp_path / "s"
    args = ["sample", "--ckpt", ckpt, "--out", out, "-n", "2", "--steps", "1", "--device", "cpu"]
    assert _invoke(args).exit_code == 0
    (out / "samples.json").write_bytes(JUNK)
    assert_one_line_error(_invoke([*args, "--resume"]), "samples.json")


# ----------------------------------------------------------------------------- score


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ref")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = d / "ref.npz"
    r = _invoke(["score", "ref", "--data", d, "--out", out, "--metrics", "swd"])
    assert r.exit_code == 0, r.output
    return out


def _good_samples(path: Path) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), arr_1=np.zeros(6, np.int64))
    return path


@pytest.mark.parametrize("kind", ["junk", "no_arr_0", "pickled", "truncated", "png_folder"])
def test_score_bad_samples(tmp_path, ref, kind):
    if kind == "junk":
        f = tmp_path / "s.npz"
        f.write_bytes(JUNK)
    elif kind == "no_arr_0":
        f = tmp_path / "s.npz"
        np.savez(f, images=np.zeros((6, 16, 16, 3), np.uint8))
    elif kind == "pickled":  # an object array would need pickle: refused, not executed
        f = tmp_path / "s.npz"
        np.savez(f, arr_0=np.array([{"a": 1}] * 6, dtype=object))
    elif kind == "truncated":
        f = _good_samples(tmp_path / "s.npz")
        f.write_bytes(f.read_bytes()[:300])
    else:
        f = tmp_path / "pngs"
        f.mkdir()
        rng = np.random.default_rng(0)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(f / f"{i}.png")
        (f / "3.png").write_bytes(JUNK)
    r = _invoke(["score", f, "--ref", ref, "--metrics", "swd"])
    assert_one_line_error(r, "3.png" if kind == "png_folder" else f.name)


@pytest.mark.parametrize("kind", ["junk", "samples_file"])
def test_score_bad_reference(tmp_path, kind):
    samples = _good_samples(tmp_path / "s.npz")
    bad = tmp_path / "badref.npz"
    if kind == "junk":
        bad.write_bytes(JUNK)
    else:
        _good_samples(bad)  # a samples file is not a reference
    r = _invoke(["score", samples, "--ref", bad, "--metrics", "swd"])
    assert_one_line_error(r, "badref.npz")


@pytest.mark.parametrize("kind", ["junk", "list"])
def test_score_bad_inception_weights(tmp_path, kind):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    w = tmp_path / "inception.pth"
    w.write_bytes(JUNK) if kind == "junk" else torch.save([1, 2], w)
    r = _invoke(["score", "ref", "--data", d, "--out", tmp_path / "ref.npz", "--metrics", "fid", "--inception", w])
    assert_one_line_error(r, "inception.pth")
    assert not (tmp_path / "ref.npz").exists()


def test_score_ref_from_bad_shards(tmp_path, shards):
    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    first = sorted(d.glob("*.tar"))[0]
    first.write_bytes(JUNK)
    r = _invoke(["score", "ref", "--data", d, "--out", tmp_path / "ref.npz", "--metrics", "swd"])
    assert_one_line_error(r, first.name)
    assert not (tmp_path / "ref.npz").exists()


# ----------------------------------------------------------------------------- fuzzed checkpoints


def _fuzzed_checkpoints(folder: Path, ckpt: Path) -> list[Path]:
    """200 random byte strings (some led by zip or pickle magic) and 50 truncations of a real one."""
    rng = np.random.default_rng(28)
    magic = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"PK\x05\x06"]
    lengths = [0, 1, 2, 7, 64, 512, 4096]
    bodies = [magic[i % len(magic)] + rng.bytes(int(rng.choice(lengths))) for i in range(200)]
    real = ckpt.read_bytes()
    # half anywhere, half in the last KB (only the zip's directory lost)
    cuts = [*rng.integers(0, len(real), 25), *rng.integers(len(real) - 1024, len(real), 25)]
    bodies += [real[:c] for c in cuts]
    folder.mkdir()
    files = [folder / f"f{i:03d}.pt" for i in range(len(bodies))]
    for f, b in zip(files, bodies, strict=True):
        f.write_bytes(b)
    return files


def test_fuzzed_checkpoints_are_one_line_errors_everywhere(tmp_path, ckpt, monkeypatch):
    """Each of 250 bad files as --ckpt, --guide and --init: exit 2, one `error:` line naming the file
    and what was expected, no traceback, nothing written (seeded, in-process)."""
    import typer.main
    import typer.testing

    cmd = typer.main.get_command(app)  # CliRunner rebuilds the click command on every call (~20 ms)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: cmd)
    real, good = ckpt_lib.load_for_inference, []

    def load_for_inference(path, *a, **kw):  # the good sampled checkpoint once; every bad file for real
        if Path(path).resolve() != ckpt.resolve():
            return real(path, *a, **kw)
        good[:] = good or [real(path, *a, **kw)]
        return good[0]

    monkeypatch.setattr(ckpt_lib, "load_for_inference", load_for_inference)
    files = _fuzzed_checkpoints(tmp_path / "bad", ckpt)
    recipe = tmp_path / "r.yaml"  # --init is loaded before the data is looked at
    recipe.write_text(yaml.safe_dump({**_tiny_cfg(), "data": {"shards": str(tmp_path / "none")}}))
    out, run = tmp_path / "s", tmp_path / "run"
    sample = ["sample", "--out", out, "-n", "1", "--steps", "1", "--device", "cpu"]
    for f in files:
        for args in (
            [*sample, "--ckpt", f],
            [*sample, "--ckpt", ckpt, "--guide", f, "--guide-scale", "2"],
            ["train", recipe, "--run-dir", run, "--init", f],
        ):
            r = _invoke(args)
            assert_one_line_error(r, f.name, "not a cdc checkpoint")
            assert not out.exists() and not run.exists(), args
