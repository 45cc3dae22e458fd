"""Tangent analysis: tangents, decompositions, tangent spaces, oscillation, and the disk pipeline
(MLP denoiser, 'vec' augmentations, disk presets) through the one training loop."""
import json
import math

import pytest
import torch

from ayt import analysis as A
from ayt import checkpoint as ck
from ayt.config import ConfigError, make_config, to_dict
from ayt.data import SHAPE_PARAM_NAMES, make_disk, make_shapes, render_shapes
from ayt.features import build_feature_net, freeze
from ayt.losses import MFD, direction_surrogate, pseudo_huber
from ayt.networks import MLP, build_network
from ayt.plotting import plot_tangent_grid, plot_tangent_study
from ayt.runs import build_diffusion_net
from ayt.train import train


def analytic_net(x, t, class_labels=None):
    """A smooth f(x, t) with a closed-form d/dt f(x_0 + t eps, t)."""
    t4 = t.view(-1, 1, 1, 1)
    return torch.sin(x) * torch.exp(-t4) + x * t4 ** 2 / (1 + t4)


def analytic_tangent(x_0, eps, t):
    t4 = t.view(-1, 1, 1, 1)
    x = x_0 + t4 * eps
    return (torch.cos(x) * eps * torch.exp(-t4) - torch.sin(x) * torch.exp(-t4)
            + eps * t4 ** 2 / (1 + t4) + x * (t4 ** 2 + 2 * t4) / (1 + t4) ** 2)


def test_continuous_tangent_is_exact_and_discrete_converges_to_it():
    g = torch.Generator().manual_seed(0)
    x_0, eps = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1, torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.3, 1.0, 2.5])
    exact = analytic_tangent(x_0, eps, t)
    jvp = A.continuous_tangent(analytic_net, x_0, eps, t)
    assert torch.allclose(jvp, exact, atol=1e-5)
    errors = [(A.discrete_tangent(analytic_net, x_0, eps, t, t * (1 - d)) - exact).abs().max().item()
              for d in (1e-1, 1e-2, 1e-3)]
    assert errors[1] < 0.15 * errors[0] and errors[2] < 0.15 * errors[1] + 1e-4 and errors[2] < 1e-2  # O(t - r)
    # r = 0: the teacher is x_0 (the boundary condition)
    d0 = A.discrete_tangent(analytic_net, x_0, eps, t, 0.0)
    assert torch.allclose(d0, (analytic_net(x_0 + t.view(-1, 1, 1, 1) * eps, t) - x_0) / t.view(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="r < t"):
        A.discrete_tangent(analytic_net, x_0, eps, t, t)


def test_jvp_on_edm_networks_matches_finite_differences():
    torch.manual_seed(0)
    for net, shape in ((build_network("mlp-disk", img_resolution=1, img_channels=6).eval(), (2, 6, 1, 1)),
                       (build_network("tiny", img_resolution=8, img_channels=3).eval(), (2, 3, 8, 8))):
        x_0, eps = torch.randn(shape), torch.randn(shape)
        t = torch.tensor([0.4, 3.0])
        fd = (A.discrete_tangent(net, x_0, eps, t + 1e-2, t - 1e-2))
        jvp = A.continuous_tangent(net, x_0, eps, t)
        assert torch.allclose(jvp, fd, atol=2e-3 * fd.abs().max().item() + 1e-4)


def test_update_directions_sign_and_norm():
    g = torch.Generator().manual_seed(1)
    D_t, D_r = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    w = torch.tensor([1.0, 2.0, 0.5, 10.0])
    u = A.cm_update_direction(D_t, D_r, w)
    assert torch.allclose(u.flatten(1).norm(dim=1), w)
    assert torch.allclose(A.cosine(u, D_r - D_t), torch.ones(4))
    # AYT with the plain L2 distance is ECT's direction (the gradient of ||D - D_r|| is the unit residual)
    u_l2 = A.ayt_tangent(lambda a, b: pseudo_huber(a, b), D_t, D_r, w)
    assert torch.allclose(u_l2, u, atol=1e-5)
    # sign convention: the AYT surrogate's gradient w.r.t. D_t is -(1/B) times the AYT direction
    phi = freeze(build_feature_net("mini-vgg", resolution=4, in_channels=3, num_outputs=3))
    mfd = MFD(phi)
    u_ayt = A.ayt_tangent(mfd, D_t, D_r, w)
    D = D_t.clone().requires_grad_(True)
    g_ayt = -u_ayt / w.view(-1, 1, 1, 1)
    (grad,) = torch.autograd.grad(direction_surrogate(D, g_ayt, w).mean(), D)
    assert torch.allclose(grad, -u_ayt / 4, atol=1e-6)
    assert torch.allclose(u_ayt.flatten(1).norm(dim=1), w, atol=1e-5)


def test_decompose_exact_fractions():
    g = torch.Generator().manual_seed(2)
    P, k, N = 12, 3, 5
    B, _ = torch.linalg.qr(torch.randn(P, k, generator=g, dtype=torch.float64))
    a, z = torch.randn(N, k, generator=g, dtype=torch.float64), torch.randn(N, P, generator=g, dtype=torch.float64)
    v_t = a @ B.T
    v_n = z - (z @ B) @ B.T
    scale = torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0], dtype=torch.float64)[:, None]
    v = v_t + scale * v_n
    expected = v_t.square().sum(1) / v.square().sum(1)
    tf, nf = A.decompose(v.float(), B)
    assert torch.allclose(tf.double(), expected, atol=1e-6) and torch.allclose(tf + nf, torch.ones(N))
    assert tf[0] == pytest.approx(1.0, abs=1e-6)
    # per-sample bases [N, P, k], with zero-padded columns, and images as input
    Bn = torch.cat([B.expand(N, P, k), torch.zeros(N, P, 2, dtype=torch.float64)], dim=2)
    tf2, _ = A.decompose(v.float().reshape(N, 3, 2, 2), Bn)
    assert torch.allclose(tf2, tf, atol=1e-6)
    tz, nz = A.decompose(torch.zeros(2, P), B)
    assert tz.tolist() == [0, 0] and nz.tolist() == [0, 0]
    with pytest.raises(ValueError, match="rows"):
        A.decompose(v, B[:-1])


def test_toward_manifold_cosine_on_the_disk():
    disk = make_disk(8, dim=6, seed=3)
    g = torch.Generator().manual_seed(3)
    n = torch.randn(8, 6, generator=g)
    n = disk.normal_projection(n)
    x = disk.points * 0.5 + n                                   # inside the radius, off the plane by n
    assert torch.allclose(A.toward_manifold_cosine(-n, x, disk.project), torch.ones(8), atol=1e-5)
    assert torch.allclose(A.toward_manifold_cosine(n, x, disk.project), -torch.ones(8), atol=1e-5)
    tangent = disk.tangent_projection(torch.randn(8, 6, generator=g))
    assert A.toward_manifold_cosine(tangent, x, disk.project).abs().max() < 1e-5
    assert A.toward_manifold_cosine(n, disk.points * 0.5, disk.project).abs().max() == 0  # on the manifold: 0


def test_shapes_tangent_basis():
    _, params = make_shapes(4, resolution=8, seed=0)
    params = params.double()
    B = A.shapes_tangent_basis(params, 8)
    assert B.shape[:2] == (4, 3 * 64) and B.dtype == torch.float64
    gram = B.transpose(1, 2) @ B
    rank = (B.norm(dim=1) > 0.5).sum(1)
    for i in range(4):
        assert torch.allclose(gram[i], torch.diag((torch.arange(B.shape[2]) < rank[i]).double()), atol=1e-10)
    kinds = params[:, :3].argmax(1)
    for i in range(4):   # cx, cy, size, 6 colours (+ one orientation direction unless it is a disk)
        assert rank[i] == (9 if kinds[i] == 0 else 10)
    x = render_shapes(params, 8)
    for name in ("cx", "size", "fg_g", "bg_r", "sin_ktheta"):
        j = SHAPE_PARAM_NAMES.index(name)
        p2 = params.clone()
        p2[:, j] += 1e-6
        tf, _ = A.decompose(render_shapes(p2, 8) - x, B)
        moved = (render_shapes(p2, 8) - x).flatten(1).norm(dim=1) > 0
        assert (tf[moved] > 0.999).all(), (name, tf)
    rand_tf, _ = A.decompose(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), B)
    assert rand_tf.max() < 0.2


def test_local_pca_and_augment_bases():
    g = torch.Generator().manual_seed(4)
    plane, _ = torch.linalg.qr(torch.randn(8, 2, generator=g))
    data = torch.randn(200, 2, generator=g) @ plane.T + 0.3
    B = A.local_pca_basis(data[:5], data, k_neighbors=10, dim=2)
    assert B.shape == (5, 8, 2)
    assert torch.allclose(B.transpose(1, 2) @ B, torch.eye(2).expand(5, 2, 2), atol=1e-5)
    tf, _ = A.decompose(torch.randn(5, 2, generator=g) @ plane.T, B)
    assert torch.allclose(tf, torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="k_neighbors"):
        A.local_pca_basis(data[:5], data, k_neighbors=2, dim=2)

    x, _ = make_shapes(2, resolution=8, seed=1)
    Ba = A.augment_tangent_basis(x)
    assert Ba.shape[:2] == (2, 192) and 6 <= Ba.shape[2] <= 10
    gram = Ba.transpose(1, 2) @ Ba
    assert (gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))).abs().max() < 1e-4
    tf, _ = A.decompose(torch.ones(2, 3, 8, 8), Ba)                  # a brightness change
    assert (tf > 0.999).all()


def test_update_cosines():
    outs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0], [1.0, 0.0]])[:, None]   # [K=4, N=1, 2]
    cos = A.update_cosines(outs)
    assert torch.allclose(cos[:, 0], torch.tensor([1 / math.sqrt(2), -1.0]), atol=1e-6)


def _disk_cfg(root, **over):
    base = {"stage": "consistency", "name": "osc", "run_root": str(root), "data.name": "disk",
            "data.resolution": 1, "data.num_images": 64, "net.arch": "mlp-disk", "ct.mode": "ect",
            "sample_every": 0, "device": "cpu", "iters": 3, "batch": 8}
    base.update(over)
    return make_config(None, base)


def test_oscillation_on_hand_made_checkpoints(tmp_path):
    cfg = _disk_cfg(tmp_path)
    run_dir = tmp_path / "osc"
    net = build_diffusion_net(cfg, 4, 0)
    opt = torch.optim.RAdam(net.parameters())
    biases = [[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 0, 0], [1, 0, 0, 0]]   # updates e1, e1+e2, -e1-e2
    for it, b in enumerate(biases):
        model = {k: v.clone() for k, v in net.state_dict().items()}
        model["model.output.weight"].zero_()
        model["model.output.bias"] = torch.tensor(b, dtype=torch.float32)
        ema = {k: v.clone() for k, v in model.items()}
        ema["model.output.bias"] = torch.zeros(4)                         # must not be used by default
        ck.save_atomic({"format": ck.FORMAT, "version": ck.VERSION, "stage": cfg.stage, "iteration": 10 * it,
                        "data_position": 10 * it * cfg.batch, "config": to_dict(cfg), "model": model, "ema": ema,
                        "optimizer": opt.state_dict(), "rng": {"cpu": torch.get_rng_state()},
                        "img_channels": 4, "label_dim": 0}, ck.checkpoint_path(run_dir, 10 * it))
    x_0, eps = torch.randn(3, 4, 1, 1), torch.randn(3, 4, 1, 1)
    res = A.oscillation(run_dir, x_0, eps, 1.5)
    assert res["iterations"] == [0, 10, 20, 30]
    assert torch.allclose(res["cosine"], torch.tensor([[1 / math.sqrt(2)] * 3, [-1.0] * 3]), atol=1e-5)
    c_out = 1.5 * 0.5 / math.sqrt(1.5 ** 2 + 0.25)
    assert torch.allclose(res["updates"][0, :, :, 0, 0], c_out * torch.tensor([1.0, 0, 0, 0]).expand(3, 4), atol=1e-6)
    sub = A.oscillation(run_dir, x_0, eps, 1.5, checkpoints=[0, 20, 30])
    assert sub["iterations"] == [0, 20, 30]
    ema_res = A.checkpoint_outputs(run_dir, x_0, eps, 1.5, which="ema")[1]
    assert torch.allclose(ema_res[0], ema_res[-1])
    with pytest.raises(ValueError, match="no checkpoint at iteration"):
        A.oscillation(run_dir, x_0, eps, 1.5, checkpoints=[0, 5, 10])


def test_mlp_edm_precond():
    torch.manual_seed(0)
    net = build_network("mlp-disk", img_resolution=1, img_channels=16)
    assert isinstance(net.model, MLP) and net.init_kwargs["model_type"] == "MLP"
    x = torch.randn(5, 16, 1, 1)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    y = net.eval()(x, sigma)
    assert y.shape == x.shape and y.dtype == torch.float32
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(y, c_skip.view(-1, 1, 1, 1) * x, atol=1e-3)   # output layer starts near zero
    cond = build_network("mlp-disk", img_resolution=2, img_channels=3, label_dim=4, augment_dim=2, dropout=0.5,
                         model_channels=32, num_layers=2)
    out = cond.train()(torch.randn(2, 3, 2, 2), 1.0, torch.tensor([0, 3]), torch.randn(2, 2))
    assert out.shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="unknown MLP argument"):
        build_network("mlp-disk", img_resolution=1, img_channels=4, attn_resolutions=[4])


def test_tangent_grid_rows():
    torch.manual_seed(0)
    net = build_network("tiny", img_resolution=8, img_channels=3).eval()
    x_0, _ = make_shapes(1, resolution=8)
    eps = torch.randn(1, 3, 8, 8)
    ts = [0.01, 1.0, 80.0]
    grid = A.tangent_grid(net, x_0, eps, ts, distance=lambda a, b: pseudo_huber(a, b))
    for key in ("x_t", "f", "cm_tangent", "cm_tangent_jvp", "cm_direction", "ayt_direction"):
        assert grid[key].shape == (3, 1, 3, 8, 8), key
    assert torch.allclose(grid["x_t"][1], x_0 + eps)
    assert torch.allclose(grid["ayt_direction"], grid["cm_direction"], atol=1e-4)   # L2 distance: same direction
    w = 1 / (grid["ts"] - grid["rs"])
    assert torch.allclose(grid["cm_direction"].flatten(2).norm(dim=2)[:, 0], w, rtol=1e-4)
    assert torch.allclose(A.cosine(grid["cm_direction"][:, 0], -grid["cm_tangent"][:, 0]), torch.ones(3), atol=1e-5)


def test_config_for_disk():
    assert make_config("disk-ayt").data.resolution == 1
    with pytest.raises(ConfigError, match="resolution 1"):
        make_config("disk-ect", ["data.resolution=4"])
    with pytest.raises(ConfigError, match="power of two"):
        make_config("mini-ect", ["data.resolution=1"])
    phi = build_feature_net("mlp", resolution=1, in_channels=16, num_outputs=2)
    assert phi.dim == 16 and [f.shape for f in phi.features(torch.randn(3, 16, 1, 1))][-1] == (3, 2, 1, 1)


def test_disk_pipeline_end_to_end(tmp_path, capsys):
    """Feature net ('mlp', 'vec'), EDM pretraining, ECT and AYT on the disk through ayt.train.train,
    then the disk study on the two consistency runs."""
    common = {"run_root": str(tmp_path), "data.num_images": 128, "device": "cpu", "batch": 16, "iters": 4,
              "log_every": 2, "ckpt_every": 2}
    feat = train(make_config("disk-feature-net", {**common, "feature.eval_images": 64, "feature.p_ramp_iters": 2}))
    res = json.loads((feat / "results.json").read_text())
    assert list(res["feature_net"]["r2"]) == ["mixup", "noise"]
    diff = train(make_config("disk-diffusion", common))
    runs = {}
    for arm in ("ect", "ayt"):
        cfg = make_config(f"disk-{arm}", {**common, "ckpt_every": 1, "net.init": str(diff),
                                          "ct.feature_net": str(feat)})
        runs[arm] = train(cfg)
        metrics = [json.loads(line) for line in (runs[arm] / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2
        if arm == "ayt":
            assert all(m["distance"] > 0 for m in metrics)
    capsys.readouterr()
    study = A.disk_study(runs, ts=[0.5, 5.0], n=8, seed=0)
    err = capsys.readouterr().err  # the study talks: progress over each run's checkpoints, with its final line
    assert "[tangent-study ect]" in err and "[tangent-study ayt]" in err and "ckpt" in err
    json.dumps(study)
    for arm in ("ect", "ayt"):
        r = study["runs"][arm]
        assert r["iterations"] == [1, 2, 3, 4] and r["mode"] == ("ect" if arm == "ect" else "mfd")
        rec = r["per_t"]["0.5"]
        for k in ("cm", "ayt", "jvp"):
            assert all(abs(a + b - 1) < 1e-5 for a, b in zip(rec[k]["tangent_fraction"], rec[k]["normal_fraction"]))
            assert all(-1 <= c <= 1 for c in rec[k]["toward_cosine"])
        assert len(rec["oscillation"]["cosine"]) == 2 and len(rec["oscillation"]["update_tangent_fraction"]) == 3
        assert set(r["summary"]) >= {"cm_tangent_fraction", "ayt_tangent_fraction", "oscillation_cosine_last_half",
                                     "cm_toward_cosine", "output_distance"}
    assert study["study"] == "disk" and study["manifold_dim"] == 2 and study["feature_net"] == str(feat)
    paths = plot_tangent_study(study, tmp_path / "figures")
    assert [p.name for p in paths] == ["disk_fractions_vs_t.png", "disk_over_training.png"]
    assert all(p.stat().st_size > 10000 for p in paths)


def test_shapes_study_end_to_end(tmp_path):
    """The same study on images: shapes at 8 px, exact tangent spaces from the generating parameters."""
    common = {"run_root": str(tmp_path), "data.name": "shapes", "data.resolution": 8, "data.num_images": 64,
              "device": "cpu", "batch": 8, "iters": 3, "log_every": 1, "ckpt_every": 1, "sample_every": 0,
              "keep_last": 0}  # the oscillation over training reads the raw weights of every checkpoint
    feat = train(make_config(None, {**common, "name": "feat", "stage": "feature", "feature.arch": "mini-vgg",
                                    "feature.eval_images": 16, "ema_decay": 0.0}))
    diff = train(make_config(None, {**common, "name": "diff", "stage": "diffusion", "net.arch": "tiny"}))
    runs = {arm: train(make_config(None, {**common, "name": arm, "stage": "consistency", "net.arch": "tiny",
                                          "ct.mode": mode, "net.init": str(diff), "ct.feature_net": str(feat),
                                          "ct.feature_arch": "mini-vgg"}))
            for arm, mode in (("ect", "ect"), ("ayt", "mfd"))}
    study = A.shapes_study(runs, ts=[0.1, 2.0], n=3)
    json.dumps(study)
    assert study["study"] == "shapes" and study["dim"] == 192 and 9 <= study["manifold_dim"] <= 10
    rec = study["runs"]["ayt"]["per_t"]["0.1"]
    assert "toward_cosine" not in rec["cm"] and len(rec["cm"]["tangent_fraction"]) == 3
    assert all(0 <= f <= 1 for f in rec["ayt"]["tangent_fraction"])
    assert len(rec["oscillation"]["cosine"]) == 1
    x_0 = make_shapes(1, 8)[0]
    grid = A.tangent_grid(build_network("tiny", img_resolution=8, img_channels=3).eval(), x_0, torch.randn_like(x_0),
                          [0.1, 1.0, 10.0])
    path = plot_tangent_grid(grid, tmp_path / "grid.png", rows=("x_t", "f", "cm_direction", "cm_tangent_jvp"))
    assert path.stat().st_size > 5000
