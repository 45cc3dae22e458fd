"""ayt.tracking: TensorBoard event files and the W&B logger written by the loop and by evaluation."""
import json
import math
import sys
import types

import pytest
import torch

from ayt.config import ConfigError, from_dict, to_dict
from ayt.data import make_shapes
from ayt.evaluate import EvalConfig, evaluate_run
from ayt.metrics import train_evaluator
from ayt.tracking import eval_scalars, train_scalars
from ayt.train import train
from test_train import cfg_for, read_metrics

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def fake_hook(ema, it, run_dir):
    return {"eval_fd_eval_1step": 100.0 / it}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A consistency run interrupted after 4 of 6 iterations (checkpoint at 3), its config.json rewritten
    as an older version would have written it (no `log` group), then resumed."""
    root = tmp_path_factory.mktemp("tb")
    cfg = cfg_for(root, "consistency", sample_every=3, eval_every=3)
    run = train(cfg, stop_after=4, eval_fn=fake_hook)
    old = json.loads((run / "config.json").read_text())
    del old["log"]
    (run / "config.json").write_text(json.dumps(old))
    train(cfg, resume=True, eval_fn=fake_hook)
    return run


def test_loop_writes_every_logged_quantity_once_after_resume(resumed_run):
    acc = events(resumed_run / "tb" / "train")
    records = [r for r in read_metrics(resumed_run) if "lr" in r]
    assert [r["iteration"] for r in records] == [2, 4, 6]
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_ect", "train/lr", "train/it_per_s", "train/time_s", "eval_hook/fd_eval_1step"} <= tags
    for key in records[0]:
        if key == "iteration":
            continue
        # steps 4 was logged before the interruption and again after the resume: purge_step keeps one
        assert steps(acc, f"train/{key}") == [2, 4, 6], key
        logged = [e.value for e in acc.Scalars(f"train/{key}")]
        assert logged == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert steps(acc, "eval_hook/fd_eval_1step") == [3, 6]
    assert [e.value for e in acc.Scalars("eval_hook/fd_eval_1step")] == pytest.approx([100 / 3, 100 / 6])
    imgs = acc.Images("samples")
    assert [e.step for e in imgs] == [3, 6] and imgs[0].width > 16 and imgs[0].height > 16  # a grid


def test_old_config_without_log_group_loads(resumed_run):
    cfg = from_dict(json.loads((resumed_run / "config.json").read_text()))
    assert cfg.log.tensorboard is True and cfg.log.wandb is False
    assert from_dict(to_dict(cfg)) == cfg


def test_eval_scores_equal_results_json_after_re_evaluation(resumed_run, tmp_path):
    images, params = make_shapes(256, 16, seed=1)
    ev = tmp_path / "ev.pt"
    train_evaluator(images, params, steps=5, batch_size=32, seed=0).save(ev)
    ecfg = EvalConfig(n=16, runs=1, batch=16, dfid_sigmas=(0.4,), evaluator=str(ev), ref_images=64, extras=False,
                      device="cpu")
    evaluate_run(resumed_run, ecfg, "all", log=lambda *a: None, track=True)
    evaluate_run(resumed_run, ecfg, "6", log=lambda *a: None, track=True)  # again, a second event file
    acc = events(resumed_run / "tb" / "eval")
    res = json.loads((resumed_run / "results.json").read_text())["eval"]
    for tag in ("eval/fd_eval_1step", "eval/fd_eval_2step", "eval/dfd_eval_denoise@0.4"):
        assert steps(acc, tag) == [3, 6], tag  # no duplicate step 6
    want = [r["fd_eval"]["mean"] for r in res if r["sampler"] == "1step"]
    assert [e.value for e in acc.Scalars("eval/fd_eval_1step")] == pytest.approx(want, rel=1e-6)


class FakeRun:
    def __init__(self, **kw):
        self.kw, self.logged, self.finished, self.defined = kw, [], False, []

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def finish(self):
        self.finished = True


def fake_wandb():
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kw):
        mod.runs.append(FakeRun(**kw))
        return mod.runs[-1]

    mod.init = init
    mod.Image = lambda array: ("image", array.shape)
    return mod


def test_wandb_receives_the_same_scalars(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = cfg_for(tmp_path, "consistency", sample_every=3, **{"log.wandb": True, "log.wandb_project": "p"})
    run = train(cfg)
    (w,) = wandb.runs
    assert w.finished and w.kw["project"] == "p" and w.kw["name"] == cfg.name and w.kw["resume"] == "allow"
    assert w.kw["id"] == (run / "wandb_id").read_text().strip() and w.kw["config"] == to_dict(cfg)
    scalars = {}
    for step, data in w.logged:
        floats = {k: v for k, v in data.items() if isinstance(v, float)}
        if floats:
            scalars.setdefault(step, {}).update(floats)
    acc = events(run / "tb" / "train")
    tb = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            tb.setdefault(e.step, {})[tag] = e.value
    assert scalars.keys() == tb.keys() == {2, 4, 6}
    for step in tb:
        assert scalars[step] == pytest.approx(tb[step], rel=1e-6)
    assert [(s, d["samples"][0]) for s, d in w.logged if "samples" in d] == [(3, "image"), (6, "image")]
    # a later job of the same run (evaluation) continues the same W&B run, on the eval/iteration axis
    from ayt.tracking import open_tracker
    t = open_tracker(cfg, run, "eval", purge_step=6)
    t.scalars(6, {"eval/fd_eval_1step": 1.5})
    t.close()
    assert wandb.runs[-1].kw["id"] == w.kw["id"]
    assert ("eval/*", "eval/iteration") in wandb.runs[-1].defined
    assert wandb.runs[-1].logged[-1] == (None, {"eval/iteration": 6, "eval/fd_eval_1step": 1.5})


def test_missing_packages_stop_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = cfg_for(tmp_path, "diffusion")
    with pytest.raises(ConfigError, match=r"pip install tensorboard.*log.tensorboard=false"):
        train(cfg)
    assert not (tmp_path / cfg.name).exists()
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = cfg_for(tmp_path, "diffusion", **{"log.tensorboard": False, "log.wandb": True})
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(cfg)
    assert not (tmp_path / cfg.name).exists()


def test_tags():
    assert train_scalars({"iteration": 4, "loss": 0.5, "lr": 1e-4, "eval_fd_eval_1step": 3.0, "note": "x"}) == \
        {"train/loss": 0.5, "train/lr": 1e-4, "eval_hook/fd_eval_1step": 3.0}
    recs = [{"iteration": 2, "sampler": "1step", "n": 8, "metric": "fid", "fid": {"mean": 5.0}},
            {"iteration": 2, "sampler": "1step", "n": 16, "metric": "fid", "fid": {"mean": 4.0}},  # more samples
            {"iteration": 2, "sampler": "denoise@0.2", "n": 8, "metric": "dfid", "fid": {"mean": 2.0}}]
    assert eval_scalars(recs) == {2: {"eval/fid_1step": 4.0, "eval/dfid_denoise@0.2": 2.0}}
    assert not math.isnan(eval_scalars(recs)[2]["eval/fid_1step"])
