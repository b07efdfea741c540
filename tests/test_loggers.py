"""train.log backends: TensorBoard event files and W&B offline runs read back against metrics.jsonl."""

import io
import json
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import metrics, recipe, shards  # noqa: F401  (shards: the module's fixture)

from cdc.config import ConfigError, from_dict
from cdc.train import checkpoint as C
from cdc.train.loggers import scalars
from cdc.train.loop import train

# metrics.jsonl key -> the name the backends use (docs/design-notes.md, "Logging backends")
EXPECTED = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "nonfinite_total": "train/skipped_steps",
    "grad_accum": "train/grad_accum",
    "global_batch": "train/global_batch",
    "images_per_s": "perf/images_per_s",
    "window_s": "perf/window_s",
    "tflops": "perf/tflops",
    "mfu": "perf/mfu",
    "peak_mem_gb": "perf/peak_mem_gb",
}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in test_train: on a busy 2-core machine two make tiny models far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def expected_values(line):
    """What a metrics line should put in a backend, spelled out independently of cdc.train.loggers."""
    out = {EXPECTED[k]: v for k, v in line.items() if k in EXPECTED and v is not None}
    out.update({f"train/loss_stage{k}": v for k, v in line["loss_stage"].items() if v is not None})
    return out


def png_pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def tb_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_every_metrics_key_has_a_name():
    line = {"step": 3, "loss": 0.5, "loss_stage": {"0": 0.1, "1": None}, "grad_norm": 1.0, "lr": 1e-3,
            "images_per_s": 10.0, "window_s": 2.0, "tflops": 0.1, "mfu": 0.3, "peak_mem_gb": 1.5,
            "nonfinite_total": 2, "grad_accum": 1, "global_batch": 8, "time": 1.7e9}
    assert scalars(line) == expected_values(line)
    assert set(scalars(line)) >= {"perf/mfu", "perf/peak_mem_gb", "train/loss_stage0"}


def test_tensorboard_holds_every_metric_the_grids_and_the_config(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=4, sample_every=2, log=["jsonl", "tensorboard"])), run, progress=False)
    ea, lines = tb_events(run), metrics(run)
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    # every key of the file is either a step/time or a logged scalar (mfu / peak memory are None on CPU)
    assert set().union(*lines) <= set(EXPECTED) | {"step", "time", "loss_stage"}
    want = {}
    for x in lines:
        for tag, v in expected_values(x).items():
            want.setdefault(tag, []).append((x["step"], v))
    assert set(ea.Tags()["scalars"]) == set(want) and "train/loss_stage2" in want
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in pts], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in pts], rel=1e-6), tag  # float32 events
    # one grid per sample step (the last step's is saved twice, logged once), the PNG's pixels
    imgs = ea.Images("samples/ema_grid")
    assert [e.step for e in imgs] == [2, 4]
    for e in imgs:
        got = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert np.array_equal(got, png_pixels(run / "samples" / f"step_{e.step:07d}.png"))
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert start["train.steps"].number_value == 4 and start["model.num_classes"].number_value == 10
    assert start["flow.sides"].string_value == "[8, 16, 32]"
    assert start["train.log"].string_value == '["jsonl", "tensorboard"]'


def test_tensorboard_resume_after_a_crash_has_no_duplicate_steps(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    rec = recipe(shards, steps=6, ckpt_every=4, sample_every=2, log=["jsonl", "tensorboard"])
    train(from_dict(rec), run, progress=False)
    # as if killed after logging step 6 but before its checkpoint: the resume starts at 4
    (dict(C.list_checkpoints(run / "checkpoints"))[6]).unlink()
    train(from_dict({**rec, "train": {**rec["train"], "steps": 8}}), run, progress=False)
    ea, lines = tb_events(run), metrics(run)
    assert [x["step"] for x in lines] == list(range(1, 9))
    loss = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in loss] == list(range(1, 9))  # 5 and 6 of the first stretch purged
    assert [v for _, v in loss] == pytest.approx([x["loss"] for x in lines], rel=1e-6)
    assert [e.step for e in ea.Images("samples/ema_grid")] == [2, 4, 6, 8]


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: a 7-byte file
    header, then 32 KiB blocks of chunks each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield pb.Record.FromString(buf)
            buf = b""


def test_wandb_offline_run_holds_the_metrics_and_resumes_the_same_id(shards, tmp_path, monkeypatch):  # noqa: F811
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    rec = recipe(shards, steps=4, ckpt_every=4, sample_every=2, log=["jsonl", "wandb"])
    try:
        train(from_dict(rec), run, progress=False)
        run_id = (run / "wandb_id.txt").read_text()
        train(from_dict({**rec, "train": {**rec["train"], "steps": 6}}), run, progress=False)
    finally:
        wandb.teardown()
    assert (run / "wandb_id.txt").read_text() == run_id
    stretches = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(stretches) == 2  # one offline folder per stretch, the same run id: `wandb sync` joins them
    history, config = {}, {}
    for d in stretches:
        for r in wandb_records(d / f"run-{run_id}.wandb"):
            if r.WhichOneof("record_type") == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                assert item["_step"] not in history  # no step logged twice
                history[item["_step"]] = item
            elif r.WhichOneof("record_type") == "config":
                config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    lines = metrics(run)
    for x in lines:
        got = history[x["step"]]
        assert {k: got[k] for k in expected_values(x)} == expected_values(x)  # doubles, exact
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for s in (2, 4, 6):
        media = next(d / "files" / history[s]["samples/ema_grid/path"] for d in stretches
                     if (d / "files" / history[s]["samples/ema_grid/path"]).is_file())
        assert np.array_equal(png_pixels(media), png_pixels(run / "samples" / f"step_{s:07d}.png"))
    assert config["train.steps"] == 6 and config["flow.sides"] == [8, 16, 32]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_missing_package_is_a_one_line_error_before_any_work(shards, tmp_path, monkeypatch, backend):  # noqa: F811
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(from_dict(recipe(shards, steps=2, log=["jsonl", backend])), run, progress=False)
    assert str(e.value) == (
        f"train.log: {backend} needs the {backend} package: pip install 'cdc[{backend}]' "
        f"(or drop {backend} from train.log)"
    )
    assert not run.exists()


def test_unknown_backend_is_a_config_error(shards):  # noqa: F811
    with pytest.raises(ConfigError, match=r"train.log: 'mlflow' is not one of \['jsonl', 'tensorboard', 'wandb'\]"):
        from_dict(recipe(shards, log=["jsonl", "mlflow"]))
