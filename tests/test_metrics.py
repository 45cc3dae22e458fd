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
