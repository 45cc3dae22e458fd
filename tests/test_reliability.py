"""Faults a run must survive or refuse clearly: a second writer, stale locks, concurrent results
writes, unreadable newest checkpoints, a changed process layout, retention, a full disk, bad
inputs through the CLI; and the two fidelity points of the r-mapping and the feature net's BatchNorm."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ayt import checkpoint as ck
from ayt import consistency as C
from ayt.__main__ import main as cli
from ayt.config import ConfigError, from_dict, make_config, to_dict
from ayt.runs import load_run_model
from ayt.train import Dist, check_resume_layout, train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {"stage": "diffusion", "data.name": "shapes", "data.resolution": 16, "data.num_images": 256,
        "net.arch": "tiny", "batch": 8, "log_every": 1, "ckpt_every": 2, "sample_every": 0, "device": "cpu",
        "iters": 6, "snapshot_every": 0}


def tiny(root, name="run", **over):
    return make_config(None, {**TINY, "run_root": str(root), "name": name, **over})


def cli_args(cfg_over: dict) -> list[str]:
    return [f"{k}={v}" for k, v in cfg_over.items()]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = ck.load_checkpoint(a), ck.load_checkpoint(b)
    return all(torch.equal(sa[key][k], sb[key][k]) for key in ("model", "ema") for k in sa[key])


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-iteration run keeping every checkpoint (2, 4, 6)."""
    return train(tiny(tmp_path_factory.mktemp("straight"), keep_last=0))


# ----------------------------------------------------------------------------------------------
# 1. One writer per run directory

@pytest.mark.slow
def test_second_writer_is_refused_and_sigkill_leaves_a_lock_the_next_start_takes_over(tmp_path):
    over = {k: v for k, v in TINY.items() if k != "iters"}
    cmd = [sys.executable, "-m", "ayt", "train", *cli_args({**over, "run_root": str(tmp_path), "name": "busy"})]
    first = subprocess.Popen(cmd + ["iters=100000"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    run = tmp_path / "busy"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(ck.list_checkpoints(run)) < 1:
            time.sleep(0.05)
        assert ck.list_checkpoints(run), "the first writer should have checkpointed"
        owner = json.loads((run / "LOCK").read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        out = subprocess.run(cmd + ["iters=100000", "--resume"], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr
        assert f"is in use by pid {first.pid} on {socket.gethostname()} since" in out.stderr
        assert "wait for it or stop it" in out.stderr and "Traceback" not in out.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    its = [json.loads(l)["iteration"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert its == list(range(1, len(its) + 1)), "the refused writers must not touch metrics.jsonl"
    assert (run / "LOCK").exists()  # SIGKILL leaves the lock behind ...
    done = ck.list_checkpoints(run)[-1][0]
    out = subprocess.run(cmd + [f"iters={done + 2}", "--resume"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"taking over the lock {run / 'LOCK'} left by pid {first.pid}" in out.stderr  # ... which is taken over
    assert not (run / "LOCK").exists()  # and released at the end


def test_lock_of_a_live_or_remote_owner_refuses_and_a_dead_one_is_taken_over(tmp_path, capsys):
    cfg = tiny(tmp_path, iters=2)
    run = tmp_path / "run"
    run.mkdir()
    with ck.run_lock(run):   # held by this (live) process
        with pytest.raises(ck.RunInUseError, match=f"is in use by pid {os.getpid()} on .* since .*; wait for it"):
            train(cfg)
    (run / "LOCK").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "yesterday", "token": "x"}))
    with pytest.raises(ck.RunInUseError, match="on elsewhere since yesterday; wait for it or stop it .*delete"):
        train(cfg)
    (run / "LOCK").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "then",
                                          "token": "y"}))
    train(cfg)
    assert "taking over the lock" in capsys.readouterr().err
    assert not (run / "LOCK").exists()


def test_a_failed_start_leaves_no_lock_and_no_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="net.init"):
        train(tiny(tmp_path, stage="consistency", **{"ct.mode": "ect", "net.init": str(tmp_path / "x.pkl")}))
    assert not (tmp_path / "run").exists()


def test_temp_names_are_unique_per_writer(tmp_path):
    """Concurrent writers of one path never collide on a temporary name; the result is one complete file."""
    path = tmp_path / "c" / "ckpt.pt"
    errors = []

    def writer(k):
        try:
            for i in range(20):
                ck.save_atomic({"k": torch.full((1000,), float(k)), "i": i}, path)
        except Exception as e:  # noqa: BLE001 (collected for the assertion)
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.load(path, weights_only=True)["i"] == 19
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


_WRITER = """
import os, sys, time
from ayt import checkpoint as ck
path, who, go = sys.argv[1], sys.argv[2], sys.argv[3]
open(go + "-" + who, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
for i in range(40):
    ck.update_json(path + "/results.json", lambda d, i=i: d.setdefault("eval", {}).update({f"{who}-{i}": i}))
    ck.append_jsonl(path + "/metrics.jsonl", {"who": who, "i": i, "pad": "x" * 2000})
"""


def test_concurrent_results_updates_from_two_processes_lose_nothing(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), who, str(go)], cwd=REPO, env=ENV)
             for who in ("train", "eval")]
    deadline = time.time() + 120
    while time.time() < deadline and not all(Path(f"{go}-{w}").exists() for w in ("train", "eval")):
        time.sleep(0.01)  # both processes have imported and wait for the start signal
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    res = json.loads((tmp_path / "results.json").read_text())["eval"]
    assert sorted(res) == sorted(f"{w}-{i}" for w in ("train", "eval") for i in range(40))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 80 and all(len(l["pad"]) == 2000 for l in lines)
    assert not list(tmp_path.glob("results.json.*")) and not list(tmp_path.glob("metrics.jsonl.*"))


# ----------------------------------------------------------------------------------------------
# 2. Unreadable newest checkpoint: fall back, move aside, say why

@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_falls_back_past_an_unreadable_newest_checkpoint(tmp_path, straight, capsys, damage):
    cfg = tiny(tmp_path, keep_last=0)
    train(cfg, stop_after=4)
    bad = ck.checkpoint_path(tmp_path / "run", 4)
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"")
    capsys.readouterr()
    run = train(cfg, resume=True)
    err = capsys.readouterr().err
    assert str(bad) in err and f"moved it to {bad.name}.corrupt" in err and "using the previous one" in err
    if damage == "empty":
        assert "is empty (0 bytes), probably an interrupted write" in err
    else:
        assert f"({len(data) // 2} bytes): truncated, corrupt or not a torch file" in err
    assert (bad.parent / (bad.name + ".corrupt")).exists()  # moved aside, never deleted
    assert same_weights(ck.checkpoint_path(run, 6), ck.checkpoint_path(straight, 6))  # bitwise
    its = [json.loads(l)["iteration"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4, 5, 6]


def test_sample_and_eval_fall_back_to_the_newest_readable_file(tmp_path, straight, capsys):
    from ayt.evaluate import select_checkpoints
    run = Path(shutil.copytree(straight, tmp_path / "copy"))
    ck.checkpoint_path(run, 6).write_bytes(b"")
    _, cfg, state = load_run_model(run)
    assert state["iteration"] == 4
    err = capsys.readouterr().err
    assert "ckpt-00000006.pt: it is empty (0 bytes)" in err and "ckpt-00000006.pt.corrupt" in err
    ck.checkpoint_path(run, 4).write_bytes(b"PK\x03\x04 not a zip")
    assert select_checkpoints(run, "latest") == [ck.checkpoint_path(run, 2)]
    assert "ckpt-00000004.pt" in capsys.readouterr().err
    # an explicit file is never replaced by another one: its reason is the error
    with pytest.raises(ck.CheckpointError, match="is empty"):
        load_run_model(run / "checkpoints" / "ckpt-00000006.pt.corrupt")
    rc = cli(["sample", str(run), "--n", "2", "--out", str(tmp_path / "s.png")])
    assert rc == 0 and (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------------------------
# 3. The process layout is recorded and checked on resume

def test_layout_check_on_a_fake_checkpoint():
    state = {"world_size": 2, "accum_steps": 2, "batch_per_device": 2}
    assert check_resume_layout(state, "c.pt", 2, 2, 2, allow=False) is None
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) x 2 accumulation step\(s\) x 2 images per "
                                          r"device; this start has 1 x 1 x 8.*--allow-world-change"):
        check_resume_layout(state, "c.pt", 1, 8, 1, allow=False)
    assert "will not be bitwise identical" in check_resume_layout(state, "c.pt", 1, 8, 1, allow=True)
    assert "does not record" in check_resume_layout({}, "c.pt", 1, 8, 1, allow=False)


def test_resume_with_other_micro_batching_needs_the_flag(tmp_path, capsys):
    cfg = tiny(tmp_path, batch_per_device=4)
    train(cfg, stop_after=2)
    state = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "run", 2))
    assert (state["world_size"], state["accum_steps"], state["batch_per_device"]) == (1, 2, 4)
    other = tiny(tmp_path, batch_per_device=8)
    with pytest.raises(ConfigError, match=r"1 process\(es\) x 2 accumulation step\(s\) x 4 images per device; "
                                          r"this start has 1 x 1 x 8"):
        train(other, resume=True)
    train(other, resume=True, allow_world_change=True)
    assert "not be bitwise identical" in capsys.readouterr().err
    assert ck.load_checkpoint(ck.checkpoint_path(tmp_path / "run", 6))["accum_steps"] == 1


@pytest.mark.slow
def test_resume_of_a_two_process_run_with_one_process_is_refused(tmp_path):
    over = {**TINY, "run_root": str(tmp_path), "name": "ddp", "iters": 4}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "ayt", "train", *cli_args({**over, "iters": 2})], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cmd = [sys.executable, "-m", "ayt", "train", "--resume", *cli_args(over)]
    out = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "written by 2 process(es) x 1 accumulation step(s) x 4 images" in out.stderr
    out = subprocess.run(cmd + ["--allow-world-change"], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "will not be bitwise identical" in out.stderr


# ----------------------------------------------------------------------------------------------
# 4. Retention: the last keep_last full checkpoints plus EMA snapshots

def test_retention_and_snapshots(tmp_path):
    from ayt.analysis import _checkpoint_list
    from ayt.evaluate import select_checkpoints
    run = train(tiny(tmp_path, ckpt_every=1, keep_last=2, snapshot_every=2))
    assert [it for it, _ in ck.list_checkpoints(run)] == [5, 6]
    assert [it for it, _ in ck.list_snapshots(run)] == [2, 4, 6]
    assert [it for it, _ in ck.list_weights(run, "ema")] == [2, 4, 5, 6]
    assert len(select_checkpoints(run, "all")) == 4
    assert select_checkpoints(run, "2,5,6") == [ck.snapshot_path(run, 2), ck.checkpoint_path(run, 5),
                                                ck.snapshot_path(run, 6)]
    assert [it for it, _ in _checkpoint_list(run, which="ema")] == [2, 4, 5, 6]
    assert [it for it, _ in _checkpoint_list(run, which="model")] == [5, 6]
    snap, full = ck.snapshot_path(run, 6), ck.checkpoint_path(run, 6)
    s, f = ck.load_checkpoint(snap), ck.load_checkpoint(full)
    assert set(s) >= {"ema", "config", "iteration", "img_channels"} and "model" not in s and "optimizer" not in s
    assert all(torch.equal(s["ema"][k], f["ema"][k]) for k in f["ema"])
    net, _, state = load_run_model(snap)  # sampling and evaluation read snapshots
    assert state["iteration"] == 6
    with pytest.raises(ck.CheckpointError, match="EMA-only snapshot"):
        load_run_model(snap, "model")
    # the size estimate is the file size up to the header and a few hundred bytes per stored tensor
    from ayt.runs import build_diffusion_net
    est = ck.checkpoint_bytes(build_diffusion_net(tiny(tmp_path), 3, 0))

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return 1
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
        return sum(tensors(v) for v in values)
    for path, state, key in ((full, f, "full"), (snap, s, "snapshot")):
        assert 0 < path.stat().st_size - est[key] < 20_000 + 300 * tensors(state)


def test_keep_checkpoints_of_old_configs_and_the_disk_presets(tmp_path):
    default = make_config(None, {**TINY, "name": "x"})
    assert default.keep_last == 2
    old = to_dict(default)
    old.pop("keep_last")
    assert from_dict({**old, "keep_checkpoints": True}).keep_last == 0      # every checkpoint kept
    assert from_dict({**old, "keep_checkpoints": False}).keep_last == 1     # only the latest
    # an old const-mapping run keeps its unfloored r; an old feature run its per-process BatchNorm
    old_ct = {**old, "ct": {k: v for k, v in old["ct"].items() if k != "const_floor"}}
    assert from_dict({**old_ct, "ct": {**old_ct["ct"], "mapping": "const"}}).ct.const_floor is None
    assert from_dict(old_ct).ct.const_floor == 1 / 256
    feat = {**old, "stage": "feature", "feature": {k: v for k, v in old["feature"].items() if k != "sync_bn"}}
    assert from_dict(feat).feature.sync_bn is False
    # an old run directory resumes: its config.json still says keep_checkpoints
    cfg = tiny(tmp_path, keep_last=0)
    train(cfg, stop_after=2)
    cfg_file = tmp_path / "run" / "config.json"
    d = json.loads(cfg_file.read_text())
    for key in ("keep_last", "snapshot_every"):
        d.pop(key)
    d["ct"].pop("const_floor")
    d["feature"].pop("sync_bn")
    cfg_file.write_text(json.dumps({**d, "keep_checkpoints": True}))
    train(cfg, resume=True)
    for preset in ("disk-feature-net", "disk-diffusion", "disk-ect", "disk-ayt"):  # oscillation: raw weights
        assert make_config(preset).keep_last == 0                            # at every 500 iterations


def test_readme_disk_table_is_computed():
    table = ck.disk_use_table()
    assert "| `cifar10-ayt` | 55.7M | 0.89 GB | 0.22 GB |" in table
    assert table in (REPO / "README.md").read_text(), "regenerate with: python -c \"from ayt import " \
                                                      "checkpoint; print(checkpoint.disk_use_table())\""


# ----------------------------------------------------------------------------------------------
# 5. Bad inputs: one paragraph, non-zero exit, nothing lost

def test_full_disk_while_checkpointing(tmp_path, monkeypatch, capsys):
    cfg = tiny(tmp_path, ckpt_every=3)
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:          # the checkpoint at iteration 6: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from \
                OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(ck.torch, "save", save)
    rc = cli(["train", *cli_args({**TINY, "run_root": str(tmp_path), "name": "run", "ckpt_every": 3})])
    err = capsys.readouterr().err
    assert rc == 1 and "the disk is full" in err and "ckpt-00000006.pt" in err and "Traceback" not in err
    assert "no temporary file was left" in err
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["ckpt-00000003.pt"]
    assert ck.load_checkpoint(tmp_path / "run" / "checkpoints" / files[0])["iteration"] == 3
    monkeypatch.setattr(ck.torch, "save", real)
    train(cfg, resume=True)  # free space, resume: nothing was lost
    assert [it for it, _ in ck.list_checkpoints(tmp_path / "run")] == [3, 6]


def test_non_finite_inputs_and_losses_end_without_traceback(tmp_path, monkeypatch, capsys):
    out = subprocess.run([sys.executable, "-m", "ayt", "train", *cli_args({**TINY, "run_root": str(tmp_path),
                          "name": "inf", "optim.lr": "inf"})], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and "optim.lr=inf" in out.stderr and "finite" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "inf").exists()
    from ayt import objectives
    real = objectives.DiffusionObjective.__call__

    def nan_at_3(self, net, x_0, labels, it, generator, teacher=None):
        loss, stats = real(self, net, x_0, labels, it, generator, teacher)
        return (loss * float("nan"), {"loss": loss.detach().mean() * float("nan")}) if it >= 3 else (loss, stats)
    monkeypatch.setattr(objectives.DiffusionObjective, "__call__", nan_at_3)
    rc = cli(["train", *cli_args({**TINY, "run_root": str(tmp_path), "name": "nan"})])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite loss at iteration 3" in err and "ckpt-00000002.pt" in err


def test_unwritable_run_root(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = subprocess.run([sys.executable, "-m", "ayt", "train", *cli_args({**TINY, "run_root": str(blocker),
                          "name": "r"})], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and f"cannot write the run directory {blocker / 'r'}" in out.stderr
    assert "must be a writable directory" in out.stderr and "Traceback" not in out.stderr
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):   # a read-only file system (tests may run as root, where chmod won't do)
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match="Read-only file system.*run_root=.*must be a writable directory"):
        train(tiny(tmp_path / "ro"))


def test_sample_count_must_be_positive(straight):
    for n in ("0", "-3"):
        out = subprocess.run([sys.executable, "-m", "ayt", "sample", str(straight), "--n", n], cwd=REPO, env=ENV,
                             capture_output=True, text=True)
        assert out.returncode == 2 and "--n: must be >= 1" in out.stderr and "Traceback" not in out.stderr
    from ayt.sampling import generate
    with pytest.raises(ValueError, match=">= 1"):
        generate(lambda x, t, y: x, "consistency", 0, 3, 16, 0, 0, "cpu")


def test_resume_names_each_changed_setting(straight, tmp_path):
    run = Path(shutil.copytree(straight, tmp_path / straight.name))
    cfg = make_config(None, {**TINY, "run_root": str(tmp_path), "name": run.name, "keep_last": 0,
                             "optim.lr": 5e-4, "ct.k": 4})
    with pytest.raises(ConfigError, match=r"differ from the run's .*config.json: ct.k: 8.0 -> 4.0; "
                                          r"optim.lr: 0.0001 -> 0.0005\."):
        train(cfg, resume=True)
    # settings that do not change the weights may change
    ok = make_config(None, {**TINY, "run_root": str(tmp_path), "name": run.name, "keep_last": 3,
                            "iters": 6, "log_every": 3, "snapshot_every": 2})
    train(ok, resume=True)


def test_net_init_from_a_feature_network_run(tmp_path):
    feat = train(make_config(None, {**TINY, "stage": "feature", "run_root": str(tmp_path), "name": "feat",
                                    "feature.arch": "mini-vgg", "feature.eval_images": 16, "iters": 2,
                                    "ema_decay": 0.0}))
    with pytest.raises(ck.CheckpointError, match=re.escape(f"net.init={feat} is a feature-network run") +
                       ".*ct.feature_net"):
        train(tiny(tmp_path, "ct", stage="consistency", **{"ct.mode": "ect", "net.init": str(feat)}))


@pytest.fixture(scope="module")
def evaluator_file(tmp_path_factory):
    from ayt.data import make_shapes
    from ayt.metrics import train_evaluator
    images, params = make_shapes(128, 16, seed=1)
    path = tmp_path_factory.mktemp("ev") / "ev.pt"
    train_evaluator(images, params, steps=2, batch_size=32, seed=0).save(path)
    return str(path)


def test_bad_reference_statistics_fail_before_sampling(tmp_path, straight, evaluator_file, monkeypatch):
    import ayt.evaluate as E
    from ayt.evaluate import EvalConfig, evaluate_run
    monkeypatch.setattr(E, "sampler", lambda *a, **k: pytest.fail("a sample was drawn"))
    dim = E.shapes_evaluator(16, evaluator_file).features(torch.zeros(1, 3, 16, 16)).shape[-1]
    cases = {"nosigma": ({"mu": np.zeros(dim)}, r"lack the key\(s\) \['sigma'\]"),
             "wrongdim": ({"mu": np.zeros(5), "sigma": np.eye(5)}, f"expected mu \\[{dim}\\]"),
             "nan": ({"mu": np.full(dim, np.nan), "sigma": np.eye(dim)}, f"NaN or infinite values \\({dim} in mu")}
    for name, (arrays, msg) in cases.items():
        ref = tmp_path / f"{name}.npz"
        np.savez(ref, **arrays)
        ecfg = EvalConfig(metric="fd_eval", n=4, runs=1, ref=str(ref), evaluator=evaluator_file, device="cpu")
        with pytest.raises(ValueError, match=msg):
            evaluate_run(straight, ecfg, log=lambda *a: None)
    out = subprocess.run([sys.executable, "-m", "ayt", "eval", str(straight), "--ref", str(tmp_path / "nosigma.npz"),
                          "--evaluator", evaluator_file, "--n", "4", "--runs", "1", "--device", "cpu"], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "nosigma.npz lack the key(s) ['sigma']" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------------------------
# 6. Fidelity: the const mapping's floor, the sigmoid mapping untouched, SyncBatchNorm

T = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 80.0])


def test_const_mapping_has_the_authors_floor():
    # q = 256 at stage 2: q^-(s+1) = 2^-24 is below the floor; r = t (1 - 1/256), w = 256 / t stays finite
    r = C.t_to_r(T, 2, 256.0, mapping="const")
    assert torch.equal(r, T * torch.tensor(1 - 1 / 256))
    w = C.ect_weight(T, r)
    assert torch.isfinite(w).all() and torch.allclose(w, 256 / T, rtol=1e-4)
    # official ECT's unfloored form, kept as const_floor=None: the gap is 2^-24 t, w ~ 1.7e7 / t
    r_ect = C.t_to_r(T, 2, 256.0, mapping="const", const_floor=None)
    assert ((T - r_ect) / T).max() < 3e-7
    # above the floor both forms agree (q = 2 up to stage 6: 2^-7 > 1/256)
    for s in range(7):
        assert torch.equal(C.t_to_r(T, s, 2.0, mapping="const"), C.t_to_r(T, s, 2.0, mapping="const", const_floor=None))
    assert torch.equal(C.t_to_r(T, 14, 2.0, mapping="const"), C.t_to_r(T, 0, 256.0, mapping="const"))
    sched = C.TRSchedule.from_config(make_config(None, {"ct.mode": "ect", "ct.mapping": "const", "ct.stage": 2}).ct)
    assert sched.const_floor == 1 / 256 and torch.equal(sched.r(T, 0), r)


# t_to_r(T, stage, q, 8, 1, "sigmoid") as computed before the const floor existed (float32, hex)
SIGMOID_R = {(256.0, 0): ["0x1.0107320000000p-9", "0x1.91c28e0000000p-5", "0x1.f7f5980000000p-2",
                          "0x1.f9b26a0000000p-1", "0x1.7dee4e0000000p+1", "0x1.3ec0000000000p+6"],
             (2.0, 0): ["0x0.0p+0", "0x0.0p+0", "0x0.0p+0", "0x0.0p+0", "0x1.dc9d900000000p-1", "0x1.4000000000000p+5"],
             (2.0, 3): ["0x1.68943e0000000p-10", "0x1.1c28d40000000p-5", "0x1.7f597e0000000p-2",
                        "0x1.9b26a80000000p-1", "0x1.5ee4ec0000000p+1", "0x1.2c00000000000p+6"]}


@pytest.mark.parametrize("q,stage", list(SIGMOID_R))
def test_sigmoid_mapping_is_unchanged(q, stage):
    expected = torch.tensor([float.fromhex(h) for h in SIGMOID_R[(q, stage)]])
    for floor in (1 / 256, None):
        assert torch.equal(C.t_to_r(T, stage, q, 8.0, 1.0, "sigmoid", floor), expected)


def test_feature_net_batchnorm_is_synchronised_on_gpus(capsys):
    from ayt.features import build_feature_net
    from ayt.train import _sync_batchnorm
    net = build_feature_net("mini-vgg", resolution=16, in_channels=3, num_outputs=15)
    keys, params = list(net.state_dict()), list(net.parameters())
    cpu = _sync_batchnorm(net, Dist(world=2, device=torch.device("cpu")), micro=4)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in cpu.modules())
    assert "SyncBatchNorm needs GPUs" in capsys.readouterr().out
    gpu = _sync_batchnorm(net, Dist(world=2, device=torch.device("cuda", 0)), micro=4)  # conversion only
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in gpu.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in gpu.modules())
    assert list(gpu.state_dict()) == keys and all(a is b for a, b in zip(gpu.parameters(), params))
    assert "8 images per BatchNorm" in capsys.readouterr().out
