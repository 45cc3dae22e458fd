"""Whether a trained feature network learned: the verdict in results.json and the loud warning that every
AYT run (and the demo) prints when it loads a feature net that did not."""
import json
import math

from ayt.runs import LEARNED_LABELS, LEARNED_R2, feature_net_verdict, load_feature_net, warn_if_feature_net_untrained
from ayt.train import train
from test_train import cfg_for


def test_verdict_counts_labels_at_the_threshold():
    good = {"noise": 0.9, "blur": LEARNED_R2, "scale": -0.2, "hue_cos": math.nan}
    bad = {"noise": 0.9, "blur": 0.49, "scale": -0.2, "hue_cos": math.nan}
    assert LEARNED_LABELS == 2
    assert feature_net_verdict(good) == {"learned": True, "labels_above": ["noise", "blur"], "threshold": LEARNED_R2,
                                         "min_labels": 2}
    assert not feature_net_verdict(bad)["learned"]
    assert feature_net_verdict({"noise": 0.7})["learned"]  # a one-label set needs its one label
    assert not feature_net_verdict({"noise": math.nan})["learned"]


def _feature_run(root, r2):
    run = root / "fn"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"feature_net": {"r2": r2}}))
    return run


def test_warning_names_the_run_and_the_labels(tmp_path, capsys):
    run = _feature_run(tmp_path, {"noise": 0.8, "blur": 0.1, "scale": -0.3})
    assert not warn_if_feature_net_untrained(run)["learned"]
    err = capsys.readouterr().err
    assert "WARNING: feature net" in err and str(run) in err and "did NOT learn" in err and "noise" in err
    (tmp_path / "x").mkdir()
    good = _feature_run(tmp_path / "x", {"noise": 0.8, "blur": 0.6})
    assert warn_if_feature_net_untrained(good)["learned"] and capsys.readouterr().err == ""
    assert warn_if_feature_net_untrained(tmp_path / "missing") is None


def test_trained_feature_run_records_its_verdict_and_loading_warns(tmp_path, capsys):
    run = train(cfg_for(tmp_path, "feature", iters=2))  # 2 iterations: it cannot have learned
    verdict = json.loads((run / "results.json").read_text())["feature_net"]["verdict"]
    assert verdict["learned"] is False and "did NOT learn" in capsys.readouterr().out
    load_feature_net(str(run), "mini-vgg", 16, 3, 15)
    assert "did NOT learn" in capsys.readouterr().err
    control = train(cfg_for(tmp_path, "feature", iters=0, tag="random"))  # the untrained control: on purpose
    capsys.readouterr()
    load_feature_net(str(control), "mini-vgg", 16, 3, 15)
    assert "did NOT learn" not in capsys.readouterr().err
