import pytest
import yaml

from cdc import config as C


def test_defaults_are_the_papers_table7():
    cfg = C.Config()
    assert (cfg.model.depth, cfg.model.width, cfg.model.heads, cfg.model.patch) == (28, 1152, 16, 4)
    assert cfg.flow.sides == [32, 64, 128, 256] and cfg.flow.sigma == 1.0 and cfg.flow.gamma == 2.0
    assert cfg.train.lr == 1e-4 and cfg.train.betas == [0.9, 0.95] and cfg.train.eps == 1e-6
    assert cfg.train.ema_decay == 0.9999 and cfg.train.grad_clip == 1.0 and cfg.train.batch_size == 8
    assert cfg.sample.steps == [24] and cfg.sample.cfg == [3.0]


def test_preset_then_explicit_keys_and_overrides():
    cfg = C.from_dict({"model": {"preset": "S", "depth": 3}}, ["train.lr=3e-4", "flow.sides=[8,16,32]"])
    assert (cfg.model.depth, cfg.model.width, cfg.model.heads) == (3, 384, 6)
    assert cfg.train.lr == 3e-4 and cfg.flow.sides == [8, 16, 32]


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"model": {"widht": 3}}, "model.widht"),
        ({"modle": {}}, "modle"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"compile": 1}}, "train.compile"),
        ({"train": {"compile": "yes"}}, "train.compile"),
        ({"flow": {"sides": [32, 48]}}, "flow.sides"),
        ({"flow": {"bounds": [0, 0.7, 0.5, 0.9, 1]}}, "flow.bounds"),
        ({"model": {"preset": "huge"}}, "model.preset"),
        ({"flow": {"tau_dist": "beta"}}, "flow.tau_dist"),
        ({"flow": {"tau_dist": "logit_normal", "tau_scale": 0}}, "flow.tau_scale"),
        ({"sample": {"solver": "rk4"}}, "sample.solver"),
        ({"sample": {"solver": "sde"}, "flow": {"interpolant": "trig"}}, "sample.solver: sde"),
        ({"sample": {"guide_scale": [2.0]}}, "sample.guide"),
        ({"sample": {"guide": "step:10", "guide_scale": [2.0, 1.0]}}, "sample.guide_scale"),
        # ranges, checked before anything divides by them
        ({"model": {"heads": 0}}, "model.heads must be >= 1"),
        ({"model": {"patch": 0}}, "model.patch must be >= 1"),
        ({"flow": {"sides": [0, 8]}}, "flow.sides"),
        ({"train": {"steps": -5}}, "train.steps must be >= 1"),
        ({"train": {"max_nonfinite": 0}}, "train.max_nonfinite must be >= 1"),
        ({"train": {"ema_decay": 2.0}}, "train.ema_decay must be in [0, 1)"),
        ({"train": {"betas": [0.9, 1.5]}}, "train.betas"),
        ({"train": {"lr": 0.0}}, "train.lr must be > 0"),
        ({"train": {"max_minutes": -1.0}}, "train.max_minutes must be >= 0"),
        ({"sample": {"batch": 0}}, "sample.batch must be >= 1"),
        ({"sample": {"sde_eps": -1.0}}, "sample.sde_eps must be >= 0"),
        ({"data": {"workers": -1}}, "data.workers must be >= 0"),
    ],
)
def test_bad_keys_are_one_line_errors_naming_the_key(raw, needle):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.from_dict({}, ["lr=3"])


def test_dump_roundtrip(tmp_path):
    cfg = C.from_dict(
        {"model": {"preset": "tiny"}, "flow": {"sides": [8, 16, 32], "bounds": [0, 0.2, 0.5, 1]}}
    )
    p = tmp_path / "c.yaml"
    p.write_text(C.dump(cfg))
    assert C.load(p) == cfg


def test_compile_takes_true_false_or_auto():
    """train.compile is `bool | str`: YAML booleans stay booleans, "auto" is the one string."""
    assert C.from_dict({"train": {"compile": True}}).train.compile is True
    assert C.from_dict({}, ["train.compile=false"]).train.compile is False
    assert C.from_dict({}, ["train.compile=auto"]).train.compile == "auto"
    with pytest.raises(C.ConfigError, match=r"train.compile: expected true/false or str, got 1\.5"):
        C.from_dict({"train": {"compile": 1.5}})
    cfg = C.from_dict({}, ["train.compile=auto"])
    assert C.from_dict(yaml.safe_load(C.dump(cfg))).train.compile == "auto"  # survives config.yaml
