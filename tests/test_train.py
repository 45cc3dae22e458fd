"""The one training loop: every stage end to end, exact resume, kill/resume, DDP, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ayt import checkpoint as ck
from ayt.config import ConfigError, make_config
from ayt.train import NonFiniteLossError, batch_indices, train

REPO = Path(__file__).resolve().parents[1]
TINY = {"data.name": "shapes", "data.resolution": 16, "data.num_images": 256, "net.arch": "tiny",
        "batch": 8, "log_every": 2, "ckpt_every": 3, "sample_every": 0, "device": "cpu"}


def cfg_for(tmp_path, stage, **over):
    base = dict(TINY, stage=stage, run_root=str(tmp_path), name=f"{stage}-{over.pop('tag', 'run')}", iters=6)
    if stage == "feature":
        base.update({"feature.arch": "mini-vgg", "feature.p_ramp_iters": 2, "feature.eval_images": 64, "ema_decay": 0.0})
    if stage == "consistency":
        base.update({"ct.mode": "ect", "optim.lr": 5e-4, "ema_decay": 0.9})
    base.update(over)
    return make_config(None, base)


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    return train(cfg_for(root, "feature"))


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff")
    return train(cfg_for(root, "diffusion"))


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_feature_stage(feature_run):
    res = json.loads((feature_run / "results.json").read_text())
    assert len(res["feature_net"]["r2"]) == 15
    assert [it for it, _ in ck.list_checkpoints(feature_run)] == [3, 6]
    m = read_metrics(feature_run)
    assert [r["iteration"] for r in m] == [2, 4, 6] and all(r["loss"] > 0 for r in m)


def test_diffusion_stage(diffusion_run):
    state = ck.load_checkpoint(ck.resolve_checkpoint(diffusion_run))
    assert state["iteration"] == 6 and state["stage"] == "diffusion" and state["data_position"] == 48
    assert set(state) >= {"model", "ema", "optimizer", "rng", "config"}


@pytest.mark.parametrize("mode", ["ect", "mfd", "ect+mfd"])
def test_consistency_stage(tmp_path, feature_run, diffusion_run, mode):
    cfg = cfg_for(tmp_path, "consistency", tag=mode.replace("+", "_"), **{
        "ct.mode": mode, "net.init": str(diffusion_run), "ct.feature_net": str(feature_run), "sample_every": 6})
    run = train(cfg)
    m = read_metrics(run)
    assert all("loss_ect" in r for r in m)
    if mode != "ect":
        assert all(r["distance"] > 0 for r in m)
    assert (run / "samples" / "samples-00000006.png").exists()


def _weights(run_dir):
    state = ck.load_checkpoint(ck.resolve_checkpoint(run_dir))
    return state


def _assert_same_state(a, b):
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), f"optimizer {k} differs"


def test_resume_is_bitwise_exact(tmp_path, feature_run, diffusion_run):
    over = {"ct.mode": "ect+mfd", "net.init": str(diffusion_run), "ct.feature_net": str(feature_run),
            "ckpt_every": 3, "iters": 6}
    straight = train(cfg_for(tmp_path / "a", "consistency", **over))
    half = cfg_for(tmp_path / "b", "consistency", **over)
    train(half, stop_after=3)
    assert [it for it, _ in ck.list_checkpoints(tmp_path / "b" / half.name)] == [3]
    resumed = train(half, resume=True)
    _assert_same_state(_weights(straight), _weights(resumed))
    assert [r["iteration"] for r in read_metrics(resumed)] == [r["iteration"] for r in read_metrics(straight)]


def test_continuing_a_finished_run_equals_the_longer_run(tmp_path, diffusion_run):
    """A finished run resumed with a larger `iters` (how the mini study lengthens its reporting runs) is the
    run trained that long in one go, under ECT's doubling schedule too."""
    over = {"net.init": str(diffusion_run), "ct.q": 2, "ct.double_every": 2, "ckpt_every": 3}
    straight = train(cfg_for(tmp_path / "a", "consistency", iters=6, **over))
    train(cfg_for(tmp_path / "b", "consistency", iters=3, **over))
    longer = train(cfg_for(tmp_path / "b", "consistency", iters=6, **over), resume=True)
    _assert_same_state(_weights(straight), _weights(longer))
    trained = json.loads((Path(longer) / "results.json").read_text())["train"]
    assert trained["iterations"] == 6 and trained["started_at_iteration"] == 3
    assert [(x["from"], x["to"]) for x in trained["sessions"]] == [(0, 3), (3, 6)]  # both sessions' time is kept


def test_train_sessions_recover_the_old_single_session_entry():
    from ayt.train import train_sessions
    old = {"iterations": 2000, "wall_clock_s_last_session": 650.0, "started_at_iteration": 0}
    assert train_sessions(old, 2000, 4000, 700.04) == [{"from": 0, "to": 2000, "wall_clock_s": 650.0},
                                                        {"from": 2000, "to": 4000, "wall_clock_s": 700.0}]
    assert train_sessions(None, 0, 10, 1.0) == [{"from": 0, "to": 10, "wall_clock_s": 1.0}]
    again = train_sessions(old, 2000, 2000, 0.5)  # a finished run resumed without raising iters
    assert again == [{"from": 0, "to": 2000, "wall_clock_s": 650.0}]


def test_killed_run_resumes(tmp_path, diffusion_run):
    """SIGKILL mid-training (in a subprocess), then --resume: the result equals an uninterrupted run."""
    args = ["name=killed", f"run_root={tmp_path}", "stage=diffusion", "iters=40", "ckpt_every=2", "log_every=1",
            *[f"{k}={v}" for k, v in TINY.items() if k not in ("ckpt_every", "log_every")]]
    cmd = [sys.executable, "-m", "ayt", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and len(ck.list_checkpoints(run_dir)) < 2:
        time.sleep(0.05)
    time.sleep(0.3)  # let it log past the checkpoint: those records must not be duplicated after resume
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = ck.list_checkpoints(run_dir)[-1][0]
    assert 2 <= done_before < 40, "the kill should land mid-training"
    # every checkpoint left behind is complete and loadable
    for _, p in ck.list_checkpoints(run_dir):
        ck.load_checkpoint(p)
    out = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed from" in out.stdout
    straight_args = [a if not a.startswith("name=") else "name=straight" for a in args]
    out2 = subprocess.run([sys.executable, "-m", "ayt", "train", *straight_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert out2.returncode == 0, out2.stderr
    _assert_same_state(_weights(run_dir), _weights(tmp_path / "straight"))
    its = [r["iteration"] for r in read_metrics(run_dir)]
    assert its == list(range(1, 41))


@pytest.mark.parametrize("stage,extra", [("diffusion", []),
                                         ("consistency", ["ct.mode=ect", "batch_per_device=2"])])
def test_torchrun_two_processes_gloo(tmp_path, stage, extra):
    """2 processes (gloo): the run completes and both replicas hold identical weights; the consistency
    case also covers the shared-dropout step under DDP and gradient accumulation (no_sync)."""
    args = ["name=ddp", f"run_root={tmp_path}", f"stage={stage}", "iters=4", "ckpt_every=2", *extra,
            *[f"{k}={v}" for k, v in TINY.items() if k not in ("ckpt_every",)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "ayt", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["ddp"]["world_size"] == 2
    assert res["ddp"]["max_param_diff_across_ranks"] == 0.0
    assert "2 process(es)" in out.stdout
    if extra:
        assert "batch 8 = 2 x 2 x 2" in out.stdout


def test_batch_indices_cover_epochs():
    idx = torch.cat([batch_indices(10, 4, it, seed=0) for it in range(5)])  # 20 draws = 2 epochs
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 3, 0), batch_indices(10, 4, 3, 0))


def test_bad_paths_and_runs(tmp_path, diffusion_run):
    with pytest.raises(FileNotFoundError, match="net.init"):
        train(cfg_for(tmp_path, "consistency", **{"net.init": str(tmp_path / "missing.pkl")}))
    with pytest.raises(FileNotFoundError, match="feature_net"):
        train(cfg_for(tmp_path, "consistency", tag="f", **{"ct.mode": "mfd", "ct.feature_net": str(tmp_path / "nope")}))
    # a corrupt checkpoint as init
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x04not really a checkpoint")
    with pytest.raises(Exception, match="corrupt|cannot read|not a"):
        train(cfg_for(tmp_path, "consistency", tag="c", **{"net.init": str(bad)}))
    # feature net passed as a consistency init: another model
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(bad)
    # an existing run without --resume, and --resume with other settings
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg_for(diffusion_run.parent, "diffusion"))
    with pytest.raises(ConfigError, match="differ"):
        train(cfg_for(diffusion_run.parent, "diffusion", **{"optim.lr": 0.5}), resume=True)


def test_foreign_checkpoint_is_refused(tmp_path, feature_run):
    # a feature-net run cannot initialise a diffusion network
    with pytest.raises(ck.CheckpointError, match="does not match"):
        train(cfg_for(tmp_path, "consistency", **{"net.init": str(feature_run)}))


def nan_loss_from(monkeypatch, first: int) -> None:
    """Make the diffusion objective's loss NaN from 0-based iteration `first` on."""
    from ayt import objectives
    real = objectives.DiffusionObjective.__call__

    def nan_from(self, net, x_0, labels, it, generator, teacher=None):
        loss, stats = real(self, net, x_0, labels, it, generator, teacher)
        if it >= first:
            loss = loss * float("nan")
            stats = {"loss": loss.detach().mean()}
        return loss, stats
    monkeypatch.setattr(objectives.DiffusionObjective, "__call__", nan_from)


def test_nan_loss_stops_before_update(tmp_path, diffusion_run, monkeypatch):
    nan_loss_from(monkeypatch, 4)
    cfg = cfg_for(tmp_path, "diffusion", tag="nan")
    with pytest.raises(NonFiniteLossError, match="iteration 4") as err:
        train(cfg)
    assert err.value.iteration == 4
    assert [it for it, _ in ck.list_checkpoints(tmp_path / cfg.name)] == [3]
    # results.json says so (sweeps count a diverged run as a result); a later finish removes the note
    res = tmp_path / cfg.name / "results.json"
    diverged = json.loads(res.read_text())["diverged"]
    assert diverged["iteration"] == 4 and "non-finite loss at iteration 4" in diverged["message"]
    monkeypatch.undo()
    train(cfg, resume=True)
    assert "diverged" not in json.loads(res.read_text()) and json.loads(res.read_text())["train"]["iterations"] == cfg.iters


def test_cli_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ayt", "train", "--preset", "nope"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "unknown preset" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ayt", "train", "--preset", "mini-ect", "optim.lrr=1"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown setting 'optim.lrr'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ayt", "train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "mini-ayt" in out.stdout and "ct.mode" in out.stdout


def test_feature_net_from_plain_state_dict(tmp_path, feature_run):
    """The authors' release format: a bare VGG state dict, architecture named by ct.feature_arch."""
    from ayt.runs import load_feature_net
    state = ck.load_checkpoint(ck.resolve_checkpoint(feature_run))["model"]
    plain = tmp_path / "phi.pt"
    torch.save(state, plain)
    phi = load_feature_net(str(plain), "mini-vgg", 16, 3, 15)
    ref = load_feature_net(str(feature_run), "unused", 16, 3, 15)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(phi.features(x), ref.features(x)))
    with pytest.raises(ck.CheckpointError, match="does not match"):
        load_feature_net(str(plain), "vgg11", 16, 3, 15)
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "dp.pt")  # DataParallel keys load too
    dp = load_feature_net(str(tmp_path / "dp.pt"), "mini-vgg", 16, 3, 15)
    assert all(torch.equal(a, b) for a, b in zip(dp.features(x), ref.features(x)))
