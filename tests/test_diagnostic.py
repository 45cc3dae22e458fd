"""Live tangent diagnostic (ayt.diagnostic): direction read-off, bases, logging, no effect on training."""
import json
from pathlib import Path

import pytest
import torch

from ayt import checkpoint as ck
from ayt import consistency as C
from ayt.config import ConfigError, make_config
from ayt.data import DiskDataset, ShapesDataset
from ayt.diagnostic import TangentDiagnostic, probe_tangent_basis
from ayt.networks import build_network
from ayt.train import train


def _linear_objective(a):
    """Per-sample loss <f(x_0 + t eps, t), a_b>: its update direction is -a."""
    def objective(net, x_0, labels, it, generator, teacher=None):
        t = torch.rand(x_0.shape[0], generator=generator) + 0.5
        D = net(x_0 + t.reshape(-1, 1, 1, 1) * torch.randn(x_0.shape, generator=generator), t, labels)
        return (D * a).flatten(1).sum(1), {}
    return objective


def test_disk_fractions_of_known_directions():
    ds = DiskDataset(n=64, dim=16, seed=0)
    net = build_network("mlp-disk", 1, 16).train()
    B = ds.data.basis.float()                                          # [16, 2]
    normal = torch.linalg.qr(torch.cat([B, torch.randn(16, 14)], 1))[0][:, 2:]
    along = (torch.randn(8, 2) @ B.T).reshape(8, 16, 1, 1)
    across = (torch.randn(8, 14) @ normal.T).reshape(8, 16, 1, 1)
    for a, want in ((along, 1.0), (across, 0.0), (along + across, None)):
        diag = TangentDiagnostic(_linear_objective(a), ds, "cpu", n=8)
        u, t = diag.direction(net, 0)
        torch.testing.assert_close(u, -a)
        rec = diag(net, 0)
        assert rec["diag_random_fraction"] == 2 / 16
        if want is not None:
            assert rec["diag_tangent_fraction"] == pytest.approx(want, abs=1e-5)
        else:
            assert 0 < rec["diag_tangent_fraction"] < 1


def test_global_rng_is_untouched():
    ds = DiskDataset(n=64, dim=16, seed=0)
    net = build_network("mlp-disk", 1, 16).train()
    diag = TangentDiagnostic(_linear_objective(torch.ones(8, 16, 1, 1)), ds, "cpu", n=8)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = diag(net, 0)
    assert torch.equal(torch.get_rng_state(), before)
    assert diag(net, 0)["diag_tangent_fraction"] == first["diag_tangent_fraction"]   # fixed probes, noise, t


def test_probe_bases_on_shapes():
    ds = ShapesDataset(n=200, resolution=16, seed=0)
    idx = torch.arange(4)
    x = ds.images[idx]
    exact = probe_tangent_basis(ds, idx, x, "auto")
    pca = probe_tangent_basis(ds, idx, x, "pca", reference=200, neighbors=16, dim=5)
    aug = probe_tangent_basis(ds, idx, x, "augment")
    for B in (exact, pca, aug):
        assert B.shape[:2] == (4, 768)
        gram = B.transpose(1, 2) @ B
        nonzero = B.abs().sum(1) > 0                                       # [4, k]
        eye = torch.diag_embed(nonzero.float())
        torch.testing.assert_close(gram, eye, atol=1e-4, rtol=0)
    assert pca.shape[2] == 5 and exact.shape[2] <= 10
    with pytest.raises(ValueError, match="unknown"):
        probe_tangent_basis(DiskDataset(n=10), idx, x, "bogus")


TINY = {"data.name": "shapes", "data.resolution": 16, "data.num_images": 256, "net.arch": "tiny", "batch": 8,
        "log_every": 2, "ckpt_every": 4, "sample_every": 0, "device": "cpu", "iters": 4, "optim.lr": 5e-4,
        "ema_decay": 0.9, "stage": "consistency", "ct.mode": "ect"}


def _metrics(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ect", "cct"])
def test_logged_during_training_without_changing_it(tmp_path, mode):
    on = train(make_config(None, {**TINY, "ct.mode": mode, "run_root": str(tmp_path), "name": "on",
                                  "diagnostic.every": 2, "diagnostic.samples": 6}))
    off = train(make_config(None, {**TINY, "ct.mode": mode, "run_root": str(tmp_path), "name": "off"}))
    a, b = (ck.load_checkpoint(ck.resolve_checkpoint(r)) for r in (on, off))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    diag = [r for r in _metrics(on) if "diag_tangent_fraction" in r]
    assert [r["iteration"] for r in diag] == [2, 4]
    for r in diag:
        assert 0 <= r["diag_tangent_fraction"] <= 1 and 0 < r["diag_random_fraction"] <= 10 / 768
    assert not any("diag_tangent_fraction" in r for r in _metrics(off))


def test_ect_direction_has_norm_w():
    """ECT (c = 0): -dl_b/dD_b = -w_b (D_t - D_r)/||D_t - D_r||, a vector of norm w_b = 1/(t_b - r_b)."""
    from ayt.objectives import ConsistencyObjective
    ds = ShapesDataset(n=64, resolution=16, seed=0)
    schedule = C.TRSchedule()
    diag = TangentDiagnostic(ConsistencyObjective(schedule, "ect"), ds, "cpu", n=6)
    net = build_network("tiny", 16, 3).train()
    u, t = diag.direction(net, 0)
    r = C.t_to_r(t, 0, schedule.q, schedule.k, schedule.b, schedule.mapping)
    torch.testing.assert_close(u.flatten(1).norm(dim=1), 1 / (t - r), rtol=1e-4, atol=0)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="exact"):
        make_config(None, {**TINY, "data.name": "cifar10", "data.resolution": 32, "diagnostic.basis": "exact"})
    with pytest.raises(ConfigError, match="stage=feature"):
        make_config(None, {**TINY, "stage": "feature", "diagnostic.every": 5})
    with pytest.raises(ConfigError, match="pca_dim"):
        make_config(None, {**TINY, "diagnostic.pca_dim": 40})
