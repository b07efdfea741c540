"""The `cdc` command line as a whole: option names mean one thing everywhere, flags are typed as --help
shows them, every --help has examples and says where defaults come from, renamed options keep their
old spelling for one release, a second `cdc sample` picks a fresh default folder, and a bad output
path is one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer.main
from conftest import tiny_run
from typer.testing import CliRunner

from cdc import fileio
from cdc.cli import app
from cdc.sample.generate import default_out

WIDE = {"COLUMNS": "250"}  # one help row per option line, so rows can be searched
# spellings that name the same thing; only the first may be visible (the others: hidden aliases)
SYNONYMS = [("-n", "--num-images", "--n", "--samples", "--num"), ("--src", "--data")]
RETIRED = {"--n": "-n", "--samples": "-n", "--data": "--src"}  # old spelling -> new, still accepted


def _commands() -> dict[str, object]:
    group = typer.main.get_command(app)
    return {"": group, **group.commands}


def _visible_options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option" and not p.hidden]


def _help(name: str) -> str:
    r = CliRunner().invoke(app, [*([name] if name else []), "--help"], env=WIDE)
    assert r.exit_code == 0, r.output
    return r.output


def _invoke(args: list, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def _one_line_error(r, *needles: str) -> str:
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}{r.exception!r}"
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert "Errno" not in lines[0] and ".tmp" not in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- the model of options


def test_one_name_per_meaning_and_one_meaning_per_name():
    names: dict[str, set[tuple[str, bool]]] = {}
    visible: dict[str, set[str]] = {}
    for cname, cmd in _commands().items():
        for p in _visible_options(cmd):
            for o in [*p.opts, *p.secondary_opts]:
                names.setdefault(o, set()).add((p.bare_type(), bool(p.is_flag)))
                visible.setdefault(o, set()).add(cname)
    for group in SYNONYMS:
        shown = [o for o in group if o in visible]
        assert shown == [o for o in group[:2] if o in visible], f"synonyms visible: {shown}"
    for old in RETIRED:
        assert old not in visible, f"{old} is visible in {visible[old]}"
    # an option name has one type in every command (e.g. --cfg: the same per-stage text in sample and ablate)
    assert {o: t for o, t in names.items() if len(t) > 1} == {}
    assert names["--cfg"] == names["--steps"] == {("str", False)}
    assert visible["-n"] == {"sample", "score", "ablate", "upscale", "vary", "inpaint"}
    assert visible["--src"] == {"prepare", "score"}


def test_every_boolean_is_typed_as_its_help_shows():
    for cname, cmd in _commands().items():
        text = _help(cname)
        assert "<bool>" not in text, f"`cdc {cname} --help` shows <bool>"
        for p in cmd.params:
            if p.param_type_name != "option" or p.bare_type() != "bool" or p.hidden:
                continue
            assert p.is_flag, f"{cname} {p.opts}: a bool that takes a value"
            if p.name in ("help", "version"):
                continue
            on = cmd.make_context(cname or "cdc", [p.opts[0]], resilient_parsing=True)
            assert on.params[p.name] is True
            if p.secondary_opts:
                off = cmd.make_context(cname or "cdc", [p.secondary_opts[0]], resilient_parsing=True)
                assert off.params[p.name] is False


def test_every_option_passes_through_torchrun():
    """torchrun reads an abbreviation of its own options (--n: --nnodes, --num: --numa-binding) as its own."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()

    def passes(cname: str, opt: str) -> bool:
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                return parser.parse_args(["-m", "cdc", cname, opt, "1"]).training_script_args == [cname, opt, "1"]
            except SystemExit:
                return False

    assert not passes("sample", "--n")  # the check can fail: --n abbreviates torchrun's --nnodes
    if any(o.startswith("--numa") for a in parser._actions for o in a.option_strings):  # torch >= 2.7
        assert not passes("sample", "--num")
    for cname, cmd in _commands().items():
        if not cname:
            continue
        for p in _visible_options(cmd):
            for o in [*p.opts, *p.secondary_opts]:
                assert passes(cname, o), f"torchrun -m cdc {cname} {o}: taken by torchrun"


# ----------------------------------------------------------------------------- help text


def test_every_help_shows_examples_on_their_own_lines_and_where_defaults_come_from():
    for cname, cmd in _commands().items():
        text = _help(cname)
        lines = [ln.strip() for ln in text.splitlines()]
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Examples"))
        examples = [ln for ln in lines[start + 1 :] if ln.startswith(("cdc ", "torchrun "))]
        assert len(examples) >= 2 and all(ln.count(" cdc ") + ln.startswith("cdc ") == 1 for ln in examples), text
        if cname:
            assert any(f"cdc {cname}" in ln or f"-m cdc {cname}" in ln for ln in examples)
        for p in _visible_options(cmd):
            if p.is_flag or p.required or p.name in ("help", "version"):
                continue
            says = isinstance(p.show_default, str) or p.default not in (None, [], ()) or "default" in (p.help or "")
            assert says, f"cdc {cname} {p.opts[0]}: where does its default come from?"
    text = _help("sample")
    for key in ("steps", "cfg", "seed", "batch", "guide", "guide_scale", "solver"):
        opt = "--" + key.replace("_", "-")
        row = next(ln for ln in text.splitlines() if f" {opt} " in ln)
        following = text.splitlines()[text.splitlines().index(row) : text.splitlines().index(row) + 3]
        assert any(f"[default: (from checkpoint: sample.{key})]" in ln for ln in following), row


# ----------------------------------------------------------------------------- a tiny checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with one step-10 checkpoint of a tiny randomised DiT (1 channel, sides 8/16/32)."""
    return tiny_run(tmp_path_factory.mktemp("runs"), {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
        "flow": {"sides": [8, 16, 32]},
        "sample": {"steps": [1], "cfg": [1.0], "batch": 4},
    })


def _npz(folder: Path) -> np.ndarray:
    with np.load(folder / "samples.npz") as z:
        return z["arr_0"]


# ----------------------------------------------------------------------------- renamed options


def test_old_sample_spelling_still_works_with_a_note(run_dir, tmp_path):
    common = ["sample", "--ckpt", run_dir, "--device", "cpu"]
    r = _invoke([*common, "-n", "3", "--out", tmp_path / "new"])
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    r = _invoke([*common, "--n", "3", "--out", tmp_path / "old"])
    assert r.exit_code == 0, r.output
    assert "note: --n is now -n/--num-images" in r.output
    assert np.array_equal(_npz(tmp_path / "new"), _npz(tmp_path / "old")) and len(_npz(tmp_path / "old")) == 3
    r = _invoke([*common, "--num-images", "0", "--out", tmp_path / "zero"])
    _one_line_error(r, "-n/--num-images must be >= 1")
    # an old spelling in a failing command: the note rides on the one error line
    r = _invoke([*common, "--n", "0", "--out", tmp_path / "zero"])
    _one_line_error(r, "-n/--num-images must be >= 1", "note: --n is now -n/--num-images")


def test_old_score_ref_spellings_still_work(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "imgs.npz", arr_0=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    r = _invoke(["score", "ref", "--src", tmp_path / "imgs.npz", "-n", "5", "--out", tmp_path / "a.npz", "--metrics", "swd"])
    assert r.exit_code == 0, r.output
    assert "5 images at 16px" in r.output and "note:" not in r.output
    r = _invoke(["score", "ref", "--data", tmp_path / "imgs.npz", "--n", "5", "--out", tmp_path / "b.npz", "--metrics", "swd"])
    assert r.exit_code == 0, r.output
    assert "5 images at 16px" in r.output
    assert "note: --data is now --src" in r.output and "note: --n is now -n/--num-images" in r.output
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:  # the same reference
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files if k != "meta")
        meta_a, meta_b = (json.loads(str(z["meta"])) for z in (a, b))
        assert {**meta_a, "created": 0} == {**meta_b, "created": 0} and meta_a["count"] == 5
    r = _invoke(["score", "ref", "--out", tmp_path / "c.npz"])
    _one_line_error(r, "needs --src DIR")


def test_ablate_image_count_and_per_stage_cfg(tmp_path, monkeypatch):
    from cdc.ablate import runner as A

    plans = []
    monkeypatch.setattr(A, "run_sweep", lambda p: plans.append(p) or [])
    for count in (["-n", "6"], ["--num-images", "6"], ["--samples", "6"]):
        r = _invoke(["ablate", "gamma", "--out", tmp_path / "o", *count, "--cfg", "2,3,3"])
        assert r.exit_code == 0, r.output
        assert plans[-1].n_samples == 6 and plans[-1].base.sample.cfg == [2.0, 3.0, 3.0]
        assert ("note: --samples is now -n/--num-images" in r.output) == (count[0] == "--samples")
    r = _invoke(["ablate", "gamma", "--out", tmp_path / "o", "--cfg", "2.5"])
    assert r.exit_code == 0 and plans[-1].base.sample.cfg == [2.5]  # one value: every stage
    r = _invoke(["ablate", "gamma", "--out", tmp_path / "o", "--cfg", "2,3"])  # 3 stages
    _one_line_error(r, "sample.cfg", "one per stage (3)")
    r = _invoke(["ablate", "gamma", "--out", tmp_path / "o", "-n", "1"])
    _one_line_error(r, "-n/--num-images must be >= 2")


# ----------------------------------------------------------------------------- default sample folder


def test_sampling_twice_picks_a_fresh_default_folder(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--ckpt", run_dir, "-n", "2", "--device", "cpu"]
    base = Path("samples") / "tiny-step10"
    r = _invoke(args)
    assert r.exit_code == 0, r.output
    assert f"to {base} " in r.output and "note:" not in r.output
    r = _invoke(args)
    assert r.exit_code == 0, r.output
    assert f"note: {base} holds a finished sample; writing to {base}-2" in r.output
    assert np.array_equal(_npz(base), _npz(Path(f"{base}-2")))  # same seed, same images
    r = _invoke(args)
    assert r.exit_code == 0 and f"writing to {base}-3" in r.output
    # --resume acts on the newest: nothing left to do there
    r = _invoke([*args, "--resume"])
    assert r.exit_code == 0 and f"to {base}-3 (0 new, 2 kept)" in r.output, r.output
    # an unfinished job stops the walk: refused, not skipped; --resume continues it
    meta = Path(f"{base}-2") / "samples.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "status": "running"}))
    (Path(f"{base}-2") / "images" / "000001.png").unlink()
    _one_line_error(_invoke(args), f"{base}-2 is not empty", "--resume")
    r = _invoke([*args, "--resume"])
    assert r.exit_code == 0 and f"to {base}-2 (1 new, 1 kept)" in r.output, r.output
    assert not Path(f"{base}-4").exists()
    # an explicit --out keeps its meaning: a finished folder is refused
    _one_line_error(_invoke([*args, "--out", base]), "not empty")


def test_default_out_walk(tmp_path):
    base = tmp_path / "s"
    assert default_out(base, False, False) == base
    for name in ("s", "s-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples.json").write_text('{"status": "done"}')
    assert default_out(base, False, False) == tmp_path / "s-3"
    assert default_out(base, True, False) == default_out(base, False, True) == tmp_path / "s-2"
    (tmp_path / "s-3").mkdir()  # empty: taken as it is
    assert default_out(base, False, False) == tmp_path / "s-3"
    (tmp_path / "s-3" / "x").write_text("")  # a foreign non-empty folder stops the walk
    assert default_out(base, False, False) == default_out(base, True, False) == tmp_path / "s-3"


# ----------------------------------------------------------------------------- bad output paths


def test_an_output_path_that_is_a_file_is_one_line(run_dir, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    npz = tmp_path / "imgs.npz"
    np.savez(npz, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    cases = [
        (["sample", "--ckpt", run_dir, "-n", "1", "--device", "cpu", "--out", f], "--out", "is a file, not a folder"),
        (["sample", "--ckpt", run_dir, "-n", "1", "--device", "cpu", "--out", f / "s"], "--out", "is not writable: "),
        (["prepare", "--src", "fashion-mnist", "--out", f], "--out", "is a file, not a folder"),
        (["train", recipe, "--run-dir", f / "run"], "--run-dir", "is not writable: "),
        (["score", "ref", "--src", npz, "--out", tmp_path, "--metrics", "swd"], "--out", "is a folder, not a file"),
        (["score", "ref", "--src", npz, "--out", f / "ref.npz", "--metrics", "swd"], "--out", "is not writable: "),
        (["ablate", "gamma", "--out", f], "--out", "is a file, not a folder"),
    ]
    for args, option, needle in cases:
        _one_line_error(_invoke(args), option, needle, f"choose another {option}")
    assert f.read_text() == "x"


def test_a_read_only_output_is_one_line(run_dir, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # a real read-only folder (root may write anywhere)
        ro.chmod(0o555)
        try:
            _one_line_error(_invoke(["sample", "--ckpt", run_dir, "-n", "1", "--out", ro / "s"]), "not writable")
        finally:
            ro.chmod(0o755)
    # a read-only file system, as os.access and statvfs report one
    real_access, real_statvfs = os.access, os.statvfs

    class _RO:
        f_flag = os.ST_RDONLY

    def access(p, mode, **kw):  # readable, not writable
        return not (Path(p) == ro and mode & os.W_OK) and real_access(p, mode, **kw)

    monkeypatch.setattr(fileio.os, "access", access)
    monkeypatch.setattr(fileio.os, "statvfs", lambda p: _RO() if Path(p) == ro else real_statvfs(p))
    line = _one_line_error(_invoke(["sample", "--ckpt", run_dir, "-n", "1", "--out", ro / "s"]))
    assert line == f"error: --out {ro / 's'} is not writable (read-only file system at {ro}); choose another --out"
    _one_line_error(_invoke(["prepare", "--src", "fashion-mnist", "--out", ro]), "read-only file system")
    assert list(ro.iterdir()) == []


def test_prepare_overwrite_replaces_only_what_prepare_wrote(tmp_path):
    out = tmp_path / "o"
    args = ["prepare", "--src", "fashion-mnist", "--out", out, "--shard-size", "10"]
    assert _invoke([*args, "--limit", "20"]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    _one_line_error(_invoke([*args, "--limit", "30"]), "--overwrite")
    r = _invoke([*args, "--limit", "30", "--overwrite"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 30 and len(m["shards"]) == 3 == len(list(out.glob("*.tar")))
    assert (out / "notes.txt").read_text() == "mine"
