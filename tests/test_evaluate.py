"""`python -m ayt eval` and the evaluation API on tiny CPU runs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import numpy as np
import PIL.Image

from ayt import evaluate as E
from ayt import fid
from ayt import metrics as M
from ayt.config import make_config
from ayt.data import make_shapes
from ayt.evaluate import EvalConfig, FeatureSpace, choose_metric, evaluate_run, make_eval_hook, select_checkpoints
from ayt.fid import InceptionV3FID
from ayt.metrics import train_evaluator
from ayt.runs import build_dataset
from ayt.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_inception_weights(tmp_path_factory, monkeypatch):
    """Evaluation here never finds Inception weights unless a test provides them (auto picks FD_eval / SWD),
    whatever the machine's torch hub cache holds."""
    missing = tmp_path_factory.getbasetemp() / "no-hub" / fid.FID_WEIGHTS_FILENAME
    monkeypatch.setattr(fid, "default_weights_path", lambda: str(missing))
    monkeypatch.delenv(fid.WEIGHTS_ENV_VAR, raising=False)
    return missing


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
                      device="cpu")  # auto: FD_eval on the shapes (no Inception weights here)
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


# ----------------------------------------------------------------------------------------------
# Metric choice: FID with Inception weights, else FD_eval on labelled data, else SWD; one line says why.

class _Labelled:
    """A stand-in dataset: only its size and class labels matter to the choice."""

    def __init__(self, n, classes):
        self.class_index = None if classes is None else torch.arange(n) % classes

    def __len__(self):
        return len(self.class_index) if self.class_index is not None else 300


def _cfg(name="folder", **data):
    over = {"stage": "diffusion", "data.name": name, "data.resolution": 16, **{f"data.{k}": v for k, v in data.items()}}
    if name in ("folder", "zip"):
        over.setdefault("data.root", "/data/my-images")
    return make_config(None, over)


def test_metric_choice_without_inception_weights(no_inception_weights):
    auto = EvalConfig()
    where = f"because no Inception weights were found at {no_inception_weights}"
    metric, reason = choose_metric(_cfg("shapes"), auto, _Labelled(300, None))
    assert metric == "fd_eval" and reason.startswith("metric: FD_eval (shapes evaluator") and where in reason
    assert reason.endswith("; pass --inception FILE for FID")
    metric, reason = choose_metric(_cfg("photos"), auto, _Labelled(280, 14))
    assert (metric, reason) == ("fd_eval", f"metric: FD_eval (classifier evaluator on photos source ids, 14 classes) "
                                           f"{where}; pass --inception FILE for FID")
    metric, reason = choose_metric(_cfg("cifar10"), auto, _Labelled(500, 10))
    assert metric == "fd_eval" and "cifar10 class labels, 10 classes" in reason
    for ds, why in [(_Labelled(300, None), "has no class labels (set data.labels=folders"),
                    (_Labelled(100, 2), "has 100 labelled images; the FD_eval evaluator needs at least 256"),
                    (_Labelled(300, 1), "has a single class")]:
        metric, reason = choose_metric(_cfg("folder"), auto, ds)
        assert metric == "swd" and reason.startswith("metric: SWD (multi-scale sliced Wasserstein") and where in reason
        assert why in reason, reason
        with pytest.raises(ValueError, match=r"--metric fd_eval is not possible here: .*" + why.split(" (")[0]):
            choose_metric(_cfg("folder"), EvalConfig(metric="fd_eval"), ds)
    assert choose_metric(_cfg("folder"), EvalConfig(metric="swd"), _Labelled(300, 2))[0] == "swd"
    assert choose_metric(_cfg("folder"), EvalConfig(metric="fid"), _Labelled(300, 2)) == (
        "fid", "metric: FID (requested with --metric fid)")


def test_metric_choice_with_inception_weights(tmp_path, monkeypatch):
    fake = tmp_path / "weights.pth"
    fake.write_bytes(b"not loaded to decide")  # the choice only checks that the file is there
    assert choose_metric(_cfg("shapes"), EvalConfig(inception=str(fake)), _Labelled(300, None)) == (
        "fid", f"metric: FID because the Inception weights were found at {fake}")
    monkeypatch.setenv(fid.WEIGHTS_ENV_VAR, str(fake))
    assert choose_metric(_cfg("folder"), EvalConfig(), _Labelled(300, 2))[0] == "fid"
    monkeypatch.setenv(fid.WEIGHTS_ENV_VAR, str(tmp_path / "gone.pth"))  # a stale variable: said, not fatal
    metric, reason = choose_metric(_cfg("folder"), EvalConfig(), _Labelled(300, 2))
    assert metric == "fd_eval" and f"$AYT_INCEPTION_WEIGHTS={tmp_path / 'gone.pth'} is not a file" in reason
    monkeypatch.delenv(fid.WEIGHTS_ENV_VAR)
    hub = tmp_path / "hub" / fid.FID_WEIGHTS_FILENAME  # the torch hub cache, where pytorch-fid puts them
    hub.parent.mkdir()
    hub.write_bytes(b"x")
    monkeypatch.setattr(fid, "default_weights_path", lambda: str(hub))
    assert choose_metric(_cfg("folder"), EvalConfig(), _Labelled(300, None)) == (
        "fid", f"metric: FID because the Inception weights were found at {hub}")
    with pytest.raises(fid.WeightsNotFoundError, match="missing.pth"):  # an explicit file that is not there
        choose_metric(_cfg("folder"), EvalConfig(inception=str(tmp_path / "missing.pth")), _Labelled(300, 2))


# ----------------------------------------------------------------------------------------------
# FD_eval on the photos data: classifier evaluator (cached), held-out reference, identities.

@pytest.fixture(scope="module")
def photos_env(tmp_path_factory):
    """A tiny consistency run on the photos data (280 crops, 16 px); data root (crops, evaluators) in a
    temporary directory."""
    root = tmp_path_factory.mktemp("photos")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AYT_DATA_ROOT", str(root / "data"))
        cfg = make_config(None, {"stage": "consistency", "ct.mode": "ect", "name": "ph", "run_root": str(root),
                                 "data.name": "photos", "data.resolution": 16, "data.num_images": 280,
                                 "net.arch": "tiny", "batch": 8, "iters": 2, "ckpt_every": 2, "log_every": 1,
                                 "sample_every": 0, "device": "cpu", "log.tensorboard": False})
        run = train(cfg)
        yield {"run": run, "cfg": cfg, "data": root / "data"}


def test_fd_eval_on_photos_records_and_cached_evaluator(photos_env, monkeypatch):
    monkeypatch.setenv("AYT_DATA_ROOT", str(photos_env["data"]))
    ecfg = EvalConfig(n=40, runs=1, steps=(1,), dfid_sigmas=(0.4,), batch=20, ref_images=280, evaluator_steps=30,
                      device="cpu")
    lines = []
    recs = evaluate_run(photos_env["run"], ecfg, "latest", log=lines.append)
    assert lines[0].startswith("[eval] ph: metric: FD_eval (classifier evaluator on photos source ids, 14 classes) "
                               "because no Inception weights were found at ")
    one, dfd = recs
    assert one["metric"] == "fd_eval" and one["ref"] == "photos test split, 280 images"
    for key in ("fd_eval", "precision", "recall", "swd", "swd_16px", "swd_8px"):
        assert _finite(one, key)
    assert "manifold_error" not in one and "swd_pixels" not in one
    assert dfd["metric"] == "dfd_eval" and _finite(dfd, "fd_eval") and "swd" not in dfd
    cached = list((photos_env["data"] / "evaluators").glob("photos-16px-down4-seed0-*.pt"))
    assert len(cached) == 1
    ev = M.load_evaluator(cached[0])
    assert isinstance(ev, M.ClassifierEvaluator) and ev.kwargs["n_classes"] == 14
    assert ev.meta["accuracy_on"] == "held-out split" and 0 <= ev.meta["accuracy"] <= 1
    assert ev.meta["train_images"] == E.PHOTO_EVALUATOR_IMAGES
    # the second evaluation reads the cached evaluator instead of training one
    monkeypatch.setattr(M, "train_evaluator", lambda *a, **k: pytest.fail("the evaluator was retrained"))
    again = evaluate_run(photos_env["run"], ecfg, "latest", log=lambda *a: None)
    assert again[0]["fd_eval"]["mean"] == pytest.approx(one["fd_eval"]["mean"], rel=1e-9)


def test_fd_eval_identities_in_the_feature_space(photos_env, monkeypatch):
    monkeypatch.setenv("AYT_DATA_ROOT", str(photos_env["data"]))
    ecfg = EvalConfig(n=280, runs=1, batch=70, ref_images=280, evaluator_steps=30, device="cpu")
    space = FeatureSpace(photos_env["cfg"], ecfg, "cpu")
    assert space.ref_dataset.split == "test" and space.dataset.split == "train"
    ref = space._real(280)

    def replay(images):
        return lambda i, size: images[i * ecfg.batch:i * ecfg.batch + size]
    same = space.score(replay(ref), 280)  # the reference itself: FD 0, full precision and recall, SWD 0
    assert abs(same["fd_eval"]) < 1e-5 * np.trace(space.sigma)  # 0 up to the matrix square root's rounding
    assert (same["precision"], same["recall"], same["swd"]) == (1.0, 1.0, 0.0)
    train_crops = torch.stack([space.dataset[i][0] for i in range(280)])
    noise = torch.rand(280, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    held_out_gap, far = space.score(replay(train_crops), 280), space.score(replay(noise), 280)
    assert 0 < held_out_gap["fd_eval"] < far["fd_eval"] and 0 < held_out_gap["swd"] < far["swd"]
    assert far["precision"] < held_out_gap["precision"]


def test_classifier_evaluator_cache_follows_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("AYT_DATA_ROOT", str(tmp_path / "data"))
    rng = np.random.default_rng(0)
    folder = tmp_path / "pics"
    for i in range(256):  # two classes: dark and bright 8 px images in class subfolders
        sub = folder / ("dark" if i % 2 else "bright")
        sub.mkdir(parents=True, exist_ok=True)
        base = 40 if i % 2 else 200
        PIL.Image.fromarray(rng.integers(base - 30, base + 30, (8, 8, 3)).astype(np.uint8)).save(sub / f"{i}.png")
    cfg = make_config(None, {"stage": "diffusion", "data.name": "folder", "data.root": str(folder),
                             "data.labels": "folders", "data.resolution": 8})
    ds = build_dataset(cfg)
    ev = E.classifier_evaluator(cfg, ds, steps=30)
    path = E.evaluator_path(cfg, ds)
    assert path.exists() and path.parent == tmp_path / "data" / "evaluators" and path.name.startswith("folder-pics-8px-")
    assert ev.meta["accuracy"] > 0.9 and ev.meta["accuracy_on"] == "training data"
    monkeypatch.setattr(M, "train_evaluator", lambda *a, **k: pytest.fail("the evaluator was retrained"))
    assert torch.equal(E.classifier_evaluator(cfg, ds).head.weight, ev.head.weight)
    PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(folder / "dark" / "new.png")
    assert E.evaluator_path(cfg, build_dataset(cfg)) != path  # a changed folder gets its own evaluator


def test_fd_eval_refused_before_training_on_too_small_or_unlabelled_data(tmp_path, monkeypatch):
    monkeypatch.setenv("AYT_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setattr(M, "train_evaluator", lambda *a, **k: pytest.fail("an evaluator was trained"))
    folder = tmp_path / "few"
    for i in range(20):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        PIL.Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(folder / f"c{i % 2}" / f"{i}.png")
    for labels, why in [("folders", "has 20 labelled images; the FD_eval evaluator needs at least 256"),
                        ("none", "has no class labels")]:
        cfg = make_config(None, {"stage": "diffusion", "data.name": "folder", "data.root": str(folder),
                                 "data.labels": labels, "data.resolution": 8})
        with pytest.raises(ValueError, match=rf"--metric fd_eval is not possible here: .*{why}"):
            FeatureSpace(cfg, EvalConfig(metric="fd_eval", device="cpu"), "cpu")
    assert not (tmp_path / "data" / "evaluators").exists()


# ----------------------------------------------------------------------------------------------
# SWD on an unlabelled image folder, through the command line.

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("folderrun")
    rng = np.random.default_rng(0)
    for i in range(32):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(root / f"img{i:03d}.png")
    cfg = make_config(None, {"stage": "consistency", "ct.mode": "ect", "name": "fr", "run_root": str(root / "runs"),
                             "data.name": "folder", "data.root": str(root), "data.resolution": 16,
                             "net.arch": "tiny", "batch": 8, "iters": 2, "ckpt_every": 2, "log_every": 1,
                             "sample_every": 0, "device": "cpu", "log.tensorboard": False})
    return train(cfg)


def test_swd_records_on_an_unlabelled_folder(folder_run):
    ecfg = EvalConfig(n=16, runs=2, steps=(1,), dfid_sigmas=(0.4,), batch=8, device="cpu")
    lines = []
    one, dswd = evaluate_run(folder_run, ecfg, "latest", log=lines.append)
    assert lines[0].startswith("[eval] fr: metric: SWD (multi-scale sliced Wasserstein over Laplacian-pyramid "
                               "patches, no network) because no Inception weights were found at ")
    assert "FD_eval is not possible: the folder data at" in lines[0] and "has no class labels" in lines[0]
    assert one["metric"] == "swd" and set(one) >= {"swd", "swd_16px", "swd_8px"} and "fd_eval" not in one
    assert one["ref"] == "folder train split (the training data: no held-out split), up to 32 images"
    assert _finite(one, "swd") and len(one["swd"]["runs"]) == 2
    assert one["swd"]["mean"] == pytest.approx((one["swd_16px"]["mean"] + one["swd_8px"]["mean"]) / 2)
    assert dswd["metric"] == "dswd" and _finite(dswd, "swd")
    saved = json.loads((folder_run / "results.json").read_text())["eval"]
    assert {r["metric"] for r in saved} == {"swd", "dswd"}


def test_eval_cli_prints_one_metric_line(folder_run, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "AYT_PROGRESS": "off", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "ayt", "eval", str(folder_run), "--n", "8", "--runs", "1",
                          "--steps", "1", "--no-dfid", "--batch", "8", "--no-track"], cwd=REPO, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    metric_lines = [l for l in out.stdout.splitlines() if "metric: " in l]
    assert len(metric_lines) == 1 and "metric: SWD" in metric_lines[0]
    assert str(tmp_path / "hub") in metric_lines[0] and "pass --inception FILE for FID" in metric_lines[0]


def test_swd_refuses_reference_statistics(folder_run, tmp_path):
    ref = tmp_path / "stats.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="reference statistics apply to FID and FD_eval, not to SWD"):
        evaluate_run(folder_run, EvalConfig(metric="swd", n=8, runs=1, ref=str(ref), device="cpu"),
                     log=lambda *a: None)
