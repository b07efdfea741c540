import pickle

import pytest
import torch

from cdc.train import checkpoint as C


def _state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"a": 1}}


def test_roundtrip_and_sidecar(tmp_path):
    p = C.save(tmp_path / "ck" / C.ckpt_name(5), _state(5))
    assert C.verify(p)
    s = C.load(p)
    assert s["step"] == 5 and torch.equal(s["model"]["w"], torch.full((3,), 5.0))
    assert not list((tmp_path / "ck").glob(".*tmp*"))  # no temp file left behind


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_executes_code(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        torch.save({"x": Evil()}, f, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        C.load(p)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, capsys):
    d = tmp_path / "ck"
    C.save(d / C.ckpt_name(10), _state(10))
    newest = C.save(d / C.ckpt_name(20), _state(20))
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        newest.with_name(newest.name + ".sha256").unlink()
    state, path = C.load_latest(d)
    assert state["step"] == 10 and path.name == C.ckpt_name(10)
    (line,) = capsys.readouterr().err.splitlines()  # one plain line, not Python's warning format
    assert line.startswith(f"warning: {newest}") and "corrupt" in line and line.endswith("trying an older one")


def test_prune_keeps_last_n_and_milestones(tmp_path):
    d = tmp_path / "ck"
    for s in range(100, 1100, 100):
        C.save(d / C.ckpt_name(s), _state(s))
    C.prune(d, keep_last=2, milestone_every=500)
    assert [s for s, _ in C.list_checkpoints(d)] == [1000, 900, 800, 500]  # 1000 and 500 are milestones
    assert all(C.verify(p) for _, p in C.list_checkpoints(d))


def test_resolve_run_dir_file_and_newest_run(tmp_path):
    runs = tmp_path / "runs"
    a = C.save(runs / "a" / "checkpoints" / C.ckpt_name(1), _state(1))
    b = C.save(runs / "b" / "checkpoints" / C.ckpt_name(2), _state(2))
    assert C.resolve(runs / "a") == a and C.resolve(b) == b
    assert C.resolve(None, runs) == b
    with pytest.raises(FileNotFoundError, match="no run"):
        C.resolve(None, tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        C.resolve(tmp_path / "missing.pt")
