"""Fuzzed inputs (issue 30): every file a command reads, broken at random, is one line and changes nothing.

For each kind of file (recipe YAML, `--set` values, reference .npz, samples .npz, samples folder,
shard manifest.json, the samples.json of a `cdc sample --resume` folder) the tests feed ~30 random
byte strings (some led by the format's magic), ~20 truncations of a valid file and, for YAML / JSON /
npz, values of the wrong type. Each input must end in exit code 2, one `error: ...` line that names
the file (or the --set key), no traceback, and no file created or changed (sizes and mtimes of the
whole folder compared before and after). Checkpoints are fuzzed in tests/test_bad_files.py. Seeded
and in-process, so the inputs are the same on every run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import typer.main
import typer.testing
import yaml
from PIL import Image
from typer.testing import CliRunner

from cdc import config
from cdc.cli import app
from cdc.train import checkpoint as ckpt_lib

SEED = 30
N_RANDOM, N_CUT = 30, 20


@pytest.fixture(autouse=True)
def _fast_cli(monkeypatch):
    cmd = typer.main.get_command(app)  # CliRunner rebuilds the click command on every call (~20 ms)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: cmd)


def _invoke(args: list) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: what "nothing written" is checked against."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _refused(args: list, root: Path, *needles: str) -> None:
    """The command exits 2 with one `error:` line holding `needles`, no traceback, nothing written."""
    before = _listing(root)
    r = _invoke(args)
    assert r.exit_code == 2, f"{args}: exit {r.exit_code}: {r.output}{r.exception!r}"
    assert "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.output
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    assert _listing(root) == before, f"{args} wrote files: {r.output}"


def _bodies(seed: int, magic: list[bytes], good: bytes) -> list[bytes]:
    """N_RANDOM random byte strings (every other one led by a magic) and N_CUT truncations of `good`."""
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 3, 17, 200, 3000]
    rand = [(magic[i // 2 % len(magic)] if i % 2 else b"") + rng.bytes(int(rng.choice(lengths))) for i in range(N_RANDOM)]
    cuts = sorted(int(c) for c in rng.choice(len(good), N_CUT, replace=False))
    return rand + [good[:c] for c in cuts]


def _flips(seed: int, good: bytes, n: int = 10) -> list[bytes]:
    """`n` copies of `good` with 8 bytes overwritten in its first 90% (a zip's directory survives)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = bytearray(good)
        for at in rng.integers(0, len(b) * 9 // 10, 8):
            b[at] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


def _tiny_cfg() -> dict:
    return {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16, 32]},
    }


# ----------------------------------------------------------------------------- recipe YAML and --set

RECIPE = {
    **_tiny_cfg(),
    "data": {"shards": "no-such-shards", "workers": 0, "shuffle": 8},  # every input fails, even a valid cut
    "train": {"batch_size": 4, "steps": 2, "log_every": 1, "ckpt_every": 0, "sample_every": 0, "precision": "fp32"},
}
WRONG = {  # values of the wrong type for a field holding an int / str / list
    int: [[1, 2], "abc", {"a": {"b": 1}}, None, True, 2.5],
    str: [[1], 3, {"a": 1}, True],
    list: ["abc", {"a": 1}, [[1]], [None], [{"a": 1}]],
}


def _type_wrong_recipes() -> list[dict]:
    out = []
    for sec, keys in RECIPE.items():
        for key, good in keys.items():
            hint = typing.get_type_hints(type(getattr(config.Config(), sec)))[key]
            for bad in WRONG[type(good)]:
                if bad is None and type(None) in typing.get_args(hint):
                    continue  # null is a valid value there
                r = copy.deepcopy(RECIPE)
                r[sec][key] = bad
                out.append(r)
    for sec in RECIPE:  # a section that is not a mapping, or holds an unknown key
        for bad in ([1, 2], "abc", 3, {"nonsense": 1}):
            r = copy.deepcopy(RECIPE)
            r[sec] = bad if not isinstance(bad, dict) else {**r[sec], **bad}
            out.append(r)
    out += [{**RECIPE, "nonsense": {"a": 1}}, {**RECIPE, "model": {"preset": [1]}},
            {**RECIPE, "model": {"preset": {"a": 1}}}, [RECIPE], "model", 3]  # fmt: skip
    return out


@pytest.fixture(scope="module")
def recipe_inputs() -> list[bytes]:
    good = yaml.safe_dump(RECIPE).encode()
    typed = [yaml.safe_dump(r).encode() for r in _type_wrong_recipes()]
    return _bodies(SEED, [b"model:", b"model:\n  ", b"{", b"\xef\xbb\xbf"], good) + typed


def test_fuzzed_recipes_train_and_ablate(tmp_path, monkeypatch, recipe_inputs):
    """Each fuzzed recipe as `cdc train R` and `cdc ablate gamma --recipe R`: one line naming the
    recipe when it does not load (a cut that still loads fails on the missing data), nothing written."""
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r.yaml"
    for body in recipe_inputs:
        p.write_bytes(body)
        try:
            config.load(p)
            needle = "not found"  # the missing data
        except config.ConfigError:
            needle = "r.yaml"
        _refused(["train", p, "--run-dir", tmp_path / "run"], tmp_path, needle)
        _refused(["ablate", "gamma", "--recipe", p, "--out", tmp_path / "sweep"], tmp_path, needle)
    assert len(recipe_inputs) >= N_RANDOM + N_CUT + 80


def test_type_wrong_recipe_values_are_refused_by_config(tmp_path):
    """Every wrong-type value fails config loading itself (not later in training), naming the file
    and the key."""
    p = tmp_path / "recipe.yaml"
    for raw in _type_wrong_recipes():
        p.write_text(yaml.safe_dump(raw))
        with pytest.raises(config.ConfigError, match="recipe.yaml"):
            config.load(p)


SET_VALUES = [
    "model.width=[1, 2]", "model.width=abc", "model.width=null", "model.width={a: {b: 1}}", "model.width=true",
    "model.preset=[1]", "model.preset={a: 1}", "model.preset=null", "model.nonsense=1", "nonsense.key=1",
    "flow.sides=abc", "flow.sides={a: 1}", "flow.sides=[[8]]", "flow.sides=[8, null]", "train.lr=[1",
    "train.lr='", "train.lr={", "train.lr=abc", "train.betas=null", "train.betas=[a, b]", "train.steps=1.5",
    "data.shards=[1]", "data.workers=-x", "model=3", "=1", ".=1", "model.=1", "train.precision=[fp32]",
    "sample.steps={a: 1}", "sample.cfg=[x]", "train.steps=*a", "train.steps=!!python/object:os.system",
]  # fmt: skip


def test_fuzzed_set_values(tmp_path, monkeypatch):
    """Wrong-type, unparsable and unknown `--set` values, for train and ablate: one line naming the key."""
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    for s in SET_VALUES:
        key = s.split("=", 1)[0]
        _refused(["train", p, "--run-dir", tmp_path / "run", "--set", s], tmp_path, key)
        _refused(["ablate", "gamma", "--recipe", p, "--out", tmp_path / "sweep", "--set", s], tmp_path, key)


# ----------------------------------------------------------------------------- score: samples and reference

NPZ_MAGIC = [b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY"]


def _npz(path: Path, **arrays) -> bytes:
    np.savez(path, **arrays)
    return path.read_bytes()


def _png(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory) -> Path:
    """A folder with samples.npz (6 RGB 16 px images) and ref.npz (SWD, from 6 other images)."""
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(SEED)
    imgs = d / "imgs"
    imgs.mkdir()
    for i in range(6):
        (imgs / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    r = _invoke(["score", "ref", "--data", imgs, "--out", d / "ref.npz", "--metrics", "swd"])
    assert r.exit_code == 0, r.output
    shutil.rmtree(imgs)
    _npz(d / "samples.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), arr_1=np.zeros(6, np.int64))
    r = _invoke(["score", d / "samples.npz", "--ref", d / "ref.npz", "--metrics", "swd", "--out", d / "probe.json"])
    assert r.exit_code == 0, r.output  # the good pair scores
    (d / "probe.json").unlink()
    return d


def _type_wrong_samples(tmp: Path) -> list[bytes]:
    """arr_0 of the wrong dtype, rank, shape or count, or missing, or an object array."""
    u8 = np.zeros((6, 16, 16, 3), np.uint8)
    cases = [dict(arr_0=u8.astype(np.float32)), dict(arr_0=u8[0]), dict(arr_0=u8[:, :, :8]), dict(arr_0=u8[:0]),
             dict(arr_0=np.zeros((6, 16, 16, 2), np.uint8)), dict(arr_0=np.array("abc")), dict(images=u8),
             dict(arr_0=np.array([{"a": 1}] * 6, dtype=object)), dict(arr_0=u8.astype(np.int64))]  # fmt: skip
    return [_npz(tmp / "t.npz", **c) for c in cases]


def test_fuzzed_samples_npz(tmp_path, score_dir):
    """`cdc score SAMPLES.npz --ref good`: random bytes, cuts and wrong arrays each one line naming it."""
    bad = tmp_path / "bad.npz"
    good = (score_dir / "samples.npz").read_bytes()
    bodies = _bodies(SEED + 1, NPZ_MAGIC, good) + _flips(SEED + 1, good) + _type_wrong_samples(tmp_path)
    for body in bodies:
        bad.write_bytes(body)
        _refused(["score", bad, "--ref", score_dir / "ref.npz", "--metrics", "swd"], tmp_path, "bad.npz")
    assert len(bodies) == N_RANDOM + N_CUT + 10 + 9


def test_fuzzed_samples_folder(tmp_path, score_dir):
    """`cdc score FOLDER`: two good PNGs and one broken one (random bytes, PNG magic + noise, a cut)."""
    rng = np.random.default_rng(SEED + 2)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in (0, 2):
        (folder / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    good = _png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    bodies = _bodies(SEED + 2, [b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff"], good)
    bodies = [b for b in bodies if b != good]
    for body in bodies:
        (folder / "1.png").write_bytes(body)
        _refused(["score", folder, "--ref", score_dir / "ref.npz", "--metrics", "swd"], tmp_path, "1.png")
    assert len(bodies) == N_RANDOM + N_CUT


def _ref_arrays(score_dir: Path) -> dict[str, np.ndarray]:
    with np.load(score_dir / "ref.npz") as z:
        return {k: z[k] for k in z.files}


def _type_wrong_refs(tmp: Path, score_dir: Path) -> list[bytes]:
    """A reference whose meta JSON or arrays have the wrong type: each must be refused up front."""
    good = _ref_arrays(score_dir)
    meta = json.loads(str(good["meta"]))
    metas = ["[1, 2]", "null", "3", '"abc"', "{", json.dumps({k: v for k, v in meta.items() if k != "side"})]
    for key in ("side", "swd_per_image", "swd_images", "swd_seed", "metrics", "count"):
        for v in ([1, 2], "abc", None, {"a": {"b": 1}}):
            metas.append(json.dumps({**meta, key: v}))
    out = [_npz(tmp / "t.npz", **{**good, "meta": np.array(m)}) for m in metas]
    swd = next(k for k in good if k.startswith("swd_"))
    for arr in (np.array("abc"), good[swd][0], good[swd][:, :3], np.zeros((0, good[swd].shape[1]), np.float16)):
        out.append(_npz(tmp / "t.npz", **{**good, swd: arr}))
    out.append(_npz(tmp / "t.npz", **{**good, "meta": np.zeros(3)}))
    out.append(_npz(tmp / "t.npz", **{k: v for k, v in good.items() if not k.startswith("swd_")}))
    return out


def test_fuzzed_reference_npz(tmp_path, score_dir):
    """`cdc score samples --ref BAD`: random bytes, cuts, wrong meta values and wrong arrays."""
    bad = tmp_path / "badref.npz"
    good = (score_dir / "ref.npz").read_bytes()
    bodies = _bodies(SEED + 3, NPZ_MAGIC, good) + _type_wrong_refs(tmp_path, score_dir)
    (tmp_path / "t.npz").unlink()
    samples = tmp_path / "s.npz"
    shutil.copy(score_dir / "samples.npz", samples)
    for body in bodies:
        bad.write_bytes(body)
        _refused(["score", samples, "--ref", bad, "--metrics", "swd"], tmp_path, "badref.npz")
    assert len(bodies) >= N_RANDOM + N_CUT + 30


# ----------------------------------------------------------------------------- shard manifest.json

JSON_MAGIC = [b"{", b'{"shards": [', b"[", b"\xef\xbb\xbf{"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from cdc.data.prepare import prepare

    out = tmp_path_factory.mktemp("fuzz") / "shards"
    prepare("fashion-mnist", out, limit=16, shard_size=8, progress=False)
    return out


def _type_wrong_manifests(good: dict) -> list[dict | list | None | str]:
    out: list = [[good], None, "abc", 3, {}, {**good, "shards": []}]
    for key in ("shards", "channels", "num_classes", "side", "top", "levels"):
        for v in ([1, 2] if key != "levels" else "abc", "abc" if key != "shards" else [1], None, {"a": {"b": 1}}):
            out.append({**good, key: v})
        out.append({k: v for k, v in good.items() if k != key})
    sh = good["shards"][0]
    for bad in ({**sh, "name": 3}, {**sh, "count": "x"}, {**sh, "count": None}, {"count": 8}, [sh]):
        out.append({**good, "shards": [bad, *good["shards"][1:]]})
    return out


def test_fuzzed_manifest(tmp_path, monkeypatch, shards):
    """`cdc train` whose data.shards folder has a broken manifest.json: one line naming it, no run dir."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "shards"
    shutil.copytree(shards, d)
    good_bytes = (d / "manifest.json").read_bytes()
    good = json.loads(good_bytes)
    typed = [json.dumps(m).encode() for m in _type_wrong_manifests(good)]
    bodies = _bodies(SEED + 4, JSON_MAGIC, good_bytes.rstrip()) + typed  # a cut newline is no damage
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "shards": str(d)}}))
    for body in bodies:
        (d / "manifest.json").write_bytes(body)
        _refused(["train", recipe, "--run-dir", tmp_path / "run"], tmp_path, "manifest.json")
    assert len(bodies) >= N_RANDOM + N_CUT + 40


# ----------------------------------------------------------------------------- samples.json of --resume


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, a finished `cdc sample -n 2` folder of it) from an untrained tiny model."""
    from cdc.nn.model import build_model

    d = tmp_path_factory.mktemp("sampled")
    cfg = config.from_dict(_tiny_cfg())
    sd = build_model(cfg).state_dict()
    ckpt = d / "run" / "checkpoints" / "step_0000001.pt"
    ckpt_lib.save(ckpt, {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 1})
    out = d / "s"
    r = _invoke(["sample", "--ckpt", ckpt, "--out", out, "-n", "2", "--steps", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return ckpt, out


def test_fuzzed_resume_samples_json(tmp_path, monkeypatch, sampled):
    """`cdc sample --resume` into a folder whose samples.json is broken: one line naming it, the folder
    left as it was."""
    ckpt, src = sampled
    real, cached = ckpt_lib.load_for_inference, []

    def load_for_inference(path, *a, **kw):  # the checkpoint is good: load it once
        cached[:] = cached or [real(path, *a, **kw)]
        return cached[0]

    monkeypatch.setattr(ckpt_lib, "load_for_inference", load_for_inference)
    out = tmp_path / "s"
    shutil.copytree(src, out)
    good_bytes = (out / "samples.json").read_bytes()
    good = json.loads(good_bytes)
    typed: list = [[good], None, "abc", 3, {}]
    for key in ("ckpt", "weights", "steps", "cfg", "solver", "interval", "seed", "classes"):  # resume checks these
        typed += [{**good, key: v} for v in ([1, 2], "abc", None, {"a": {"b": 1}}) if v != good.get(key)]
    bodies = _bodies(SEED + 5, JSON_MAGIC, good_bytes.rstrip()) + [json.dumps(t).encode() for t in typed]
    args = ["sample", "--ckpt", ckpt, "--out", out, "-n", "2", "--steps", "1", "--device", "cpu", "--resume"]
    for body in bodies:
        (out / "samples.json").write_bytes(body)
        _refused(args, tmp_path, "samples.json" if not isinstance(_json(body), dict) else "--resume")
    assert len(bodies) >= N_RANDOM + N_CUT + 30


def _json(body: bytes) -> object:
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:
        return None
