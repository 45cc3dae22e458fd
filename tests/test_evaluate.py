"""`python -m ayt eval` and the evaluation API on tiny CPU runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ayt.config import make_config
from ayt.data import make_shapes
from ayt.evaluate import EvalConfig, evaluate_run, make_eval_hook, select_checkpoints
from ayt.fid import InceptionV3FID
from ayt.metrics import train_evaluator
from ayt.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = make_config(None, {"stage": "consistency", "ct.mode": "ect", "name": "ct", "run_root": str(root),
                             "data.name": "shapes", "data.resolution": 16, "data.num_images": 128,
                             "net.arch": "tiny", "batch": 8, "iters": 4, "ckpt_every": 2, "log_every": 2,
                             "sample_every": 0, "device": "cpu"})
    return train(cfg)


@pytest.fixture(scope="module")
def evaluator_file(tmp_path_factory):
    images, params = make_shapes(256, 16, seed=1)
    ev = train_evaluator(images, params, steps=10, batch_size=32, seed=0)
    path = tmp_path_factory.mktemp("ev") / "ev.pt"
    ev.save(path)
    return str(path)


def _finite(rec, key):
    return all(math.isfinite(v) for v in rec[key]["runs"])


def test_fd_eval_records(ct_run, evaluator_file):
    ecfg = EvalConfig(n=24, runs=2, batch=12, dfid_sigmas=(0.4,), evaluator=evaluator_file, ref_images=64,
                      device="cpu")
    recs = evaluate_run(ct_run, ecfg, "all", log=lambda *a: None)
    samplers = {(r["iteration"], r["sampler"]) for r in recs}
    assert samplers == {(it, s) for it in (2, 4) for s in ("1step", "2step", "denoise@0.4")}
    for r in recs:
        assert _finite(r, "fd_eval") and len(r["fd_eval"]["runs"]) == 2
        assert r["fd_eval"]["min"] <= r["fd_eval"]["mean"]
    one = next(r for r in recs if r["sampler"] == "1step")
    for key in ("precision", "recall", "swd", "swd_16px", "swd_8px", "manifold_error"):
        assert _finite(one, key)
    saved = json.loads((ct_run / "results.json").read_text())["eval"]
    assert len(saved) == 6
    # re-evaluating replaces records instead of duplicating them
    evaluate_run(ct_run, ecfg, "4", log=lambda *a: None)
    assert len(json.loads((ct_run / "results.json").read_text())["eval"]) == 6


def test_fid_path_with_local_weights(ct_run, tmp_path):
    """The Inception path end to end, with a weights file the test makes (random weights)."""
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(InceptionV3FID().state_dict(), weights)
    ecfg = EvalConfig(metric="fid", n=6, runs=1, steps=(1,), dfid_sigmas=(), batch=6, inception=str(weights),
                      ref_images=8, device="cpu")
    recs = evaluate_run(ct_run, ecfg, "latest", log=lambda *a: None)
    assert len(recs) == 1 and recs[0]["metric"] == "fid" and _finite(recs[0], "fid")


def test_eval_hook_in_training(tmp_path, evaluator_file, monkeypatch):
    import ayt.evaluate as E
    real = E.shapes_evaluator
    monkeypatch.setattr(E, "shapes_evaluator", lambda res, path=None, device="cpu", **kw: real(res, evaluator_file, device))
    cfg = make_config(None, {"stage": "consistency", "ct.mode": "ect", "name": "hook", "run_root": str(tmp_path),
                             "data.name": "shapes", "data.resolution": 16, "data.num_images": 64, "net.arch": "tiny",
                             "batch": 4, "iters": 2, "ckpt_every": 2, "log_every": 1, "eval_every": 2,
                             "eval_samples": 16, "sample_every": 0, "device": "cpu"})
    run = train(cfg)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_fd_eval_1step" in l and math.isfinite(l["eval_fd_eval_1step"]) for l in lines)


def test_bad_inputs(ct_run, tmp_path):
    with pytest.raises(ValueError, match="metric"):
        EvalConfig(metric="is")
    with pytest.raises(Exception, match="no checkpoints at iterations"):
        select_checkpoints(ct_run, "3")
    out = subprocess.run([sys.executable, "-m", "ayt", "eval", str(tmp_path / "nope")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no checkpoints" in out.stderr
    # offline without Inception weights: the clear message, through the CLI
    env = {"TORCH_HOME": str(tmp_path / "hub"), "AYT_INCEPTION_WEIGHTS": "", "PATH": "/usr/bin:/bin",
           "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-m", "ayt", "eval", str(ct_run), "--metric", "fid", "--n", "4",
                          "--runs", "1", "--dfid"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "pt_inception-2015-12-05-6726825d.pth" in out.stderr
