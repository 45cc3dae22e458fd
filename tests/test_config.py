"""Typed configs, presets and overrides."""
import pytest

from ayt.config import PRESETS, ConfigError, TrainConfig, from_dict, make_config, to_dict


def test_defaults_are_the_paper_reference():
    c = TrainConfig()
    assert (c.ct.P_mean, c.ct.P_std, c.ct.q, c.ct.k, c.ct.b, c.ct.mapping, c.ct.stage) == (-1.1, 2.0, 256, 8, 1, "sigmoid", 0)
    assert c.ct.double_every is None and c.ct.c_mult == 0 and c.ct.weighting == "default"
    assert c.ct.mode == "mfd" and c.ct.mfd_eps == 1e-5 and c.ct.lam_ramp_iters == 5000
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("radam", 1e-4, 0.0)
    assert c.ema_decay == 0.9999 and c.batch == 128 and c.iters == 400000
    assert (c.feature.aug_set, c.feature.p, c.feature.p_ramp_iters) == ("geo_clr_deg", 0.15, 50000)
    assert (c.diffusion.P_mean, c.diffusion.P_std) == (-1.2, 1.2)


def test_every_preset_builds_and_round_trips():
    for name in PRESETS:
        cfg = make_config(name)
        assert cfg.name == name
        assert from_dict(to_dict(cfg)) == cfg


def test_paper_presets():
    ayt = make_config("cifar10-ayt")
    assert ayt.stage == "consistency" and ayt.ct.mode == "mfd" and ayt.net.arch == "ddpmpp-cifar10"
    assert make_config("cifar10-ect").ct.mode == "ect"
    fn = make_config("cifar10-feature-net")
    assert fn.stage == "feature" and fn.batch == 512 and fn.iters == 400000 and fn.feature.arch == "vgg16"


def test_overrides_are_typed():
    cfg = make_config("mini-ayt", ["optim.lr=2e-4", "iters=1e3", "ct.double_every=none", "data.download=true"])
    assert cfg.optim.lr == 2e-4 and cfg.iters == 1000 and cfg.ct.double_every is None and cfg.data.download is True
    cfg = make_config("mini-ayt", {"batch": 8, "optim.lr": 1})
    assert cfg.batch == 8 and cfg.optim.lr == 1.0


@pytest.mark.parametrize("overrides,match", [
    (["optim.lrr=1"], "unknown setting 'optim.lrr'"),
    (["nope=1"], "unknown setting 'nope'"),
    (["batch=abc"], "expected int"),
    (["batch=0"], "batch must be"),
    (["optim=1"], "group of settings"),
    (["ct.mode=magic"], "ct.mode"),
    (["ct.q=1"], "ct.q"),
    (["data.resolution=24"], "power of two"),
    (["ema_decay=1.5"], "ema_decay"),
    (["lr 1"], "key=value"),
    ({"batch": 8.5}, "expected int"),
])
def test_bad_settings_raise(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config("mini-ayt", overrides)


def test_unknown_preset_and_missing_feature_net():
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("cifar11-ayt")
    with pytest.raises(ConfigError, match="feature_net"):
        make_config("mini-ayt", ["ct.feature_net=none"])


def test_run_references_follow_the_run_root():
    from ayt.config import relocated_run_references
    cfg = make_config("demo-ayt", ["run_root=/tmp/x"])
    assert sorted(relocated_run_references(cfg, [])) == ["ct.feature_net=/tmp/x/demo-feature-net",
                                                          "net.init=/tmp/x/demo-diffusion"]
    assert relocated_run_references(cfg, ["net.init=mine"]) == ["ct.feature_net=/tmp/x/demo-feature-net"]
    assert relocated_run_references(make_config("demo-ayt"), []) == []
