"""Tests for ayt.metrics: precision/recall, sliced Wasserstein, FD_eval, the shapes evaluator and
the shapes-manifold error."""

import math

import numpy as np
import pytest
import torch

from ayt import fid, metrics

try:
    from ayt.data import make_shapes
except ImportError:  # pragma: no cover - ayt.data is written alongside this module
    make_shapes = None

needs_shapes = pytest.mark.skipif(make_shapes is None, reason="ayt.data.make_shapes not available")


def _shapes(n, resolution=16, seed=0):
    if make_shapes is not None:
        return make_shapes(n, resolution, seed)
    # Fallback: axis-aligned coloured squares with 5 parameters (cx, cy, half-size, grey fg, grey bg).
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 5, generator=g)
    coords = (torch.arange(resolution) + 0.5) / resolution
    cx, cy, s = 0.25 + 0.5 * p[:, 0, None, None], 0.25 + 0.5 * p[:, 1, None, None], 0.1 + 0.15 * p[:, 2, None, None]
    inside = ((coords[None, None, :] - cx).abs() < s) & ((coords[None, :, None] - cy).abs() < s)
    img = torch.where(inside, p[:, 3, None, None], p[:, 4, None, None])
    return (img[:, None].expand(-1, 3, -1, -1) * 2 - 1).contiguous(), p


# ----------------------------------------------------------------------------------------------
# Precision / recall.


def test_precision_recall_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    assert metrics.precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    far = torch.randn(150, 8, generator=g) + 100.0
    assert metrics.precision_recall(real, far, k=3, batch_size=37) == (0.0, 0.0)


def test_precision_recall_hand_computed():
    # k = 1. Real radii: all 1. Fake radii: 0.5 -> 9.5 (nearest fake is 10), others 0.5.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0], [10.5], [11.0]])
    precision, recall = metrics.precision_recall(real, fake, k=1, batch_size=3)
    assert precision == 0.25  # only 0.5 lies within distance 1 of a real point
    assert recall == 1.0  # the ball B(0.5, 9.5) covers every real point


def test_precision_recall_rejects_bad_k():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="k"):
        metrics.precision_recall(x, x, k=3)


# ----------------------------------------------------------------------------------------------
# Sliced Wasserstein.


def test_sliced_wasserstein_zero_identical_positive_shifted():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    assert metrics.sliced_wasserstein(a, a.clone(), generator=torch.Generator().manual_seed(1)) == 0.0
    # a permutation of the samples is the same empirical distribution
    sw_perm = metrics.sliced_wasserstein(a, a.flip(0), generator=torch.Generator().manual_seed(1))
    assert sw_perm == pytest.approx(0, abs=1e-12)
    v = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) * 0.1
    sw1 = metrics.sliced_wasserstein(a, a + v, generator=torch.Generator().manual_seed(2))
    sw2 = metrics.sliced_wasserstein(a, a + 2 * v, generator=torch.Generator().manual_seed(2))
    assert sw1 > 0
    # a translation by v moves every 1-D projection by theta.v: SW is linear in the shift
    assert sw2 == pytest.approx(2 * sw1, rel=1e-9)


def test_sliced_wasserstein_exact_1d():
    a = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    assert metrics.sliced_wasserstein(a, a + 0.7, n_projections=4) == pytest.approx(0.7, rel=1e-12)
    # Different sample sizes: W2^2(U{0,1}, U{0,0.5,1}) = 1/12 (quantile functions differ by 0.5 on a third).
    b = torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)
    assert metrics.sliced_wasserstein(a[:2], b, n_projections=3) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    assert metrics.sliced_wasserstein(a[:2], b, n_projections=3, p=1) == pytest.approx(1 / 6, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# FD_eval.


def test_frechet_feature_distance():
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(300, 6, generator=g)
    fb = torch.randn(200, 6, generator=g) * 2 + 1
    assert metrics.frechet_feature_distance(fa, fa) == pytest.approx(0, abs=1e-10)
    a, b = fa.double().numpy(), fb.double().numpy()
    want = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.frechet_feature_distance(fa, fb) == pytest.approx(want, rel=1e-9)
    assert want > 6  # ~ ||1||^2 + 6 (sqrt 4 - 1)^2 = 12


# ----------------------------------------------------------------------------------------------
# Evaluator.


def test_evaluator_shape_size_and_io(tmp_path):
    net = metrics.ShapesEvaluator(n_params=14).eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert 100_000 <= n_params <= 300_000
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    assert net.features(x).shape == (5, 128)
    assert net(x).shape == (5, 14)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 14)  # any resolution
    u = fid.quantize(x)
    torch.testing.assert_close(net.features(u), net.features(u.float() / 127.5 - 1))
    net.param_mean.fill_(0.5)
    path = tmp_path / "eval.pt"
    net.save(path)
    back = metrics.ShapesEvaluator.load(path)
    assert back.kwargs == net.kwargs
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)


def test_train_evaluator_reduces_loss_and_is_seeded():
    images, params = _shapes(256, 16, seed=0)
    untrained = metrics.train_evaluator(images, params, steps=0, seed=3)
    trained = metrics.train_evaluator(images, params, steps=60, batch_size=64, lr=2e-3, seed=3)
    before = metrics.evaluator_loss(untrained, images, params)
    after = metrics.evaluator_loss(trained, images, params)
    assert after < 0.7 * before
    torch.testing.assert_close(trained.param_mean, params.mean(0))
    assert not trained.training and not any(p.requires_grad for p in trained.parameters())
    again = metrics.train_evaluator(images, params, steps=5, batch_size=64, seed=3)
    again2 = metrics.train_evaluator(images, params, steps=5, batch_size=64, seed=3)
    torch.testing.assert_close(again(images[:4]), again2(images[:4]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Shapes-manifold error.


class _Oracle(torch.nn.Module):
    """Returns fixed parameters regardless of the input (stands in for a perfect evaluator)."""

    def __init__(self, params):
        super().__init__()
        self.params = params

    def forward(self, x):
        return self.params[: x.shape[0]]


@needs_shapes
def test_shapes_manifold_error_zero_on_data_large_off_manifold():
    images, params = make_shapes(32, 16, seed=1)
    err = metrics.shapes_manifold_error(images, _Oracle(params), reduction="none")
    assert err.shape == (32,)
    assert float(err.max()) < 1e-5
    noise = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.shapes_manifold_error(noise, _Oracle(params)) > 0.3


@needs_shapes
def test_shapes_manifold_error_refinement_recovers_perturbed_params():
    images, params = make_shapes(16, 16, seed=2)
    g = torch.Generator().manual_seed(0)
    noisy = params.clone()
    noisy[:, 3:6] += 0.02 * torch.randn(16, 3, generator=g)  # centre and size
    noisy[:, 8:] = (noisy[:, 8:] + 0.05 * torch.randn(16, 6, generator=g)).clamp(0, 1)  # colours
    e0 = metrics.shapes_manifold_error(images, _Oracle(noisy))
    e1 = metrics.shapes_manifold_error(images, _Oracle(noisy), refine_steps=40, lr=0.005)
    assert e0 > 0.02
    assert e1 < 0.5 * e0


# ----------------------------------------------------------------------------------------------
# Classifier evaluator (labelled data).


def _two_classes(n=256, res=8, seed=0):
    """Class 0: horizontal stripes, class 1: vertical stripes, random phase / contrast / noise (uint8)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    phase = torch.randint(0, 2, (n, 1, 1), generator=g)
    idx = torch.arange(res)
    rows = ((idx[None, :, None] + phase) % 2).expand(n, res, res).float()
    cols = ((idx[None, None, :] + phase) % 2).expand(n, res, res).float()
    stripes = torch.where(labels[:, None, None] == 0, rows, cols)
    contrast = 0.3 + 0.7 * torch.rand(n, 1, 1, generator=g)
    x = stripes * contrast + 0.1 * torch.rand(n, res, res, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    return images, labels


def test_classifier_evaluator_learns_is_seeded_and_round_trips(tmp_path):
    images, labels = _two_classes()
    untrained = metrics.train_evaluator(images, labels, steps=0, seed=1)
    assert isinstance(untrained, metrics.ClassifierEvaluator) and untrained.kwargs["n_classes"] == 2
    net = metrics.train_evaluator(images, labels, steps=40, batch_size=64, lr=3e-3, seed=1)
    assert metrics.evaluator_loss(net, images, labels) < 0.5 * metrics.evaluator_loss(untrained, images, labels)
    test_images, test_labels = _two_classes(seed=1)
    assert metrics.classifier_accuracy(net, test_images, test_labels) > 0.9
    again = metrics.train_evaluator(images, labels, steps=40, batch_size=64, lr=3e-3, seed=1)
    torch.testing.assert_close(again.features(images[:8]), net.features(images[:8]), rtol=0, atol=0)
    assert net.features(images[:5]).shape == (5, 128)
    net.meta = {"accuracy": 0.95}
    net.save(tmp_path / "clf.pt")
    back = metrics.load_evaluator(tmp_path / "clf.pt")
    assert isinstance(back, metrics.ClassifierEvaluator) and back.meta == {"accuracy": 0.95}
    torch.testing.assert_close(back(images[:4]), net(images[:4]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        metrics.train_evaluator(images, torch.zeros(256, dtype=torch.int64), steps=1)


def test_load_evaluator_reads_shapes_files_without_a_kind(tmp_path):
    net = metrics.ShapesEvaluator(n_params=3)
    torch.save({"kwargs": net.kwargs, "state_dict": net.state_dict()}, tmp_path / "old.pt")  # the earlier format
    back = metrics.load_evaluator(tmp_path / "old.pt")
    assert isinstance(back, metrics.ShapesEvaluator) and back.meta == {}


# ----------------------------------------------------------------------------------------------
# Multi-scale SWD (ProGAN) against a slow reference written with loops.


def _mirror(i, n):
    """scipy.ndimage 'mirror' index (d c b | a b c d | c b a)."""
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _ref_blur(img, scale=1.0):
    """5x5 binomial filter of one channel [H, W] (numpy) by loops, mirrored borders."""
    k = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0 * scale
    h, w = img.shape
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(k[dy + 2, dx + 2] * img[_mirror(y + dy, h), _mirror(x + dx, w)]
                            for dy in range(-2, 3) for dx in range(-2, 3))
    return out


def _ref_pyramid(img, levels):
    """Laplacian pyramid of one image [C, H, W] (numpy float64), finest first."""
    pyr = [img]
    for _ in range(1, levels):
        g = pyr[-1]
        down = np.stack([_ref_blur(c)[::2, ::2] for c in g])
        up = np.zeros_like(g)
        up[:, ::2, ::2] = down
        pyr[-1] = g - np.stack([_ref_blur(c, 4.0) for c in up])
        pyr.append(down)
    return pyr


def _ref_swd(real, fake, seed, P, repeats, dirs):
    """ProGAN's algorithm with explicit loops (same random draws as swd_multiscale, equal set sizes)."""
    g = torch.Generator().manual_seed(seed)
    res = metrics.swd_resolutions(real.shape[-1])
    pyrs = [[_ref_pyramid(x.numpy(), len(res)) for x in s] for s in (real, fake)]
    out = {}
    for lvl, r in enumerate(res):
        corners = torch.randint(0, r - 7 + 1, (real.shape[0], P, 2), generator=g).numpy()
        descs = []
        for pyr in pyrs:
            d = np.array([pyr[i][lvl][:, y:y + 7, x:x + 7] for i in range(len(pyr)) for (y, x) in corners[i]])
            for c in range(d.shape[1]):  # per-channel standardisation over the set
                vals = d[:, c].ravel()
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
                d[:, c] = (d[:, c] - mean) / std
            descs.append(d.reshape(d.shape[0], -1))
        total = 0.0
        for _ in range(repeats):
            theta = torch.randn(descs[0].shape[1], dirs, generator=g, dtype=torch.float64).numpy()
            theta /= np.sqrt((theta ** 2).sum(0, keepdims=True))
            per_dir = []
            for j in range(dirs):
                a = sorted(descs[0] @ theta[:, j])
                b = sorted(descs[1] @ theta[:, j])
                per_dir.append(sum(abs(u - v) for u, v in zip(a, b)) / len(a))
            total += sum(per_dir) / dirs
        out[r] = 1e3 * total / repeats
    return out


def test_swd_matches_a_slow_reference_loop():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)
    fake = (real + 0.3 * torch.rand(3, 2, 16, 16, generator=g, dtype=torch.float64)) ** 2
    got = metrics.swd_multiscale(real, fake, torch.Generator().manual_seed(5), patches_per_image=4, dir_repeats=2,
                                 dirs_per_repeat=3)
    want = _ref_swd(real, fake, 5, P=4, repeats=2, dirs=3)
    assert sorted(got["levels"]) == [8, 16]
    for r in (16, 8):
        assert got["levels"][r] == pytest.approx(want[r], rel=1e-9)
    assert got["mean"] == pytest.approx((want[16] + want[8]) / 2, rel=1e-9)


def test_laplacian_pyramid_matches_scipy_and_reconstructs():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    k = (np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0)[None, None]
    down = scipy_ndimage.convolve(x.numpy(), k, mode="mirror")[:, :, ::2, ::2]  # ProGAN's pyr_down
    np.testing.assert_allclose(metrics.pyr_down(x).numpy(), down, rtol=0, atol=1e-12)
    pyr = metrics.laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyr] == [16, 8, 4]
    rebuilt = pyr[-1]
    for band in pyr[-2::-1]:  # the pyramid is an exact decomposition
        rebuilt = metrics.pyr_up(rebuilt) + band
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-12)


def test_swd_identities_invariances_and_growth():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    gen = lambda: torch.Generator().manual_seed(3)
    # fewer patches and directions than ProGAN's 128 and 4 x 128: the identities hold for any counts
    metrics_swd = lambda a, b, gen: metrics.swd_multiscale(a, b, gen, patches_per_image=32, dir_repeats=2,
                                                           dirs_per_repeat=32)
    same = metrics_swd(x, x.clone(), gen())
    assert same["mean"] == 0.0 and set(same["levels"]) == {16, 8}
    # per-set standardisation: an affine change of every pixel of a set leaves SWD at 0
    assert metrics_swd(x, 3 * x + 0.5, gen())["mean"] == pytest.approx(0, abs=1e-9)
    # uint8 and [-1, 1] inputs of the same images give the same value
    u = ((x + 1) * 127.5).round().to(torch.uint8)
    y = torch.rand(48, 3, 16, 16, generator=g) * 2 - 1
    yu = ((y + 1) * 127.5).round().to(torch.uint8)
    a = metrics_swd(u, yu, gen())["mean"]
    b = metrics_swd(u.float() / 127.5 - 1, yu.float() / 127.5 - 1, gen())["mean"]
    assert a == pytest.approx(b, rel=1e-4)
    # a shift of each image's brightness (one offset per image) grows the coarse level with the offsets,
    # while the band-pass level, blind to constants, stays at 0
    offsets = torch.randn(48, 1, 1, 1, generator=g, dtype=torch.float64)
    vals = [metrics_swd(x, x + s * offsets, gen()) for s in (0.1, 0.3, 0.9)]
    assert vals[0]["levels"][8] < vals[1]["levels"][8] < vals[2]["levels"][8]
    assert max(v["levels"][16] for v in vals) == pytest.approx(0, abs=1e-9)
    # unequal set sizes: the exact 1-D distance between empirical distributions
    half = metrics_swd(x, x[:24], gen())["mean"]
    assert 0 < half < metrics_swd(x, y.double(), gen())["mean"]


def test_swd_levels_and_bad_input():
    assert metrics.swd_resolutions(8) == [8]
    assert metrics.swd_resolutions(16) == [16, 8]
    assert metrics.swd_resolutions(32) == [32, 16]
    assert metrics.swd_resolutions(64) == [64, 32, 16]
    with pytest.raises(ValueError, match="same image shape"):
        metrics.swd_multiscale(torch.zeros(2, 3, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.swd_multiscale(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
