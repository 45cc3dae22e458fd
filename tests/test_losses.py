"""MFD and the AYT update (docs/method.md sections 3 and 4)."""
import pytest
import torch

from ayt import losses as L


class TinyPhi(torch.nn.Module):
    """A small feature net with BatchNorm and two downsampling stages plus a head (as [N, L, 1, 1])."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.c2 = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
        self.head = torch.nn.Linear(6, 5)

    def features(self, x):
        f1 = torch.nn.functional.max_pool2d(self.c1(x), 2)
        f2 = torch.nn.functional.max_pool2d(self.c2(f1), 2)
        h = self.head(f2.mean((2, 3)))
        return [f1, f2, h[:, :, None, None]]


@pytest.fixture
def phi():
    torch.manual_seed(0)
    net = TinyPhi()
    with torch.no_grad():  # non-trivial running statistics, then freeze
        net.train()
        net.features(torch.randn(16, 3, 8, 8) * 2 + 0.3)
    return net.eval().requires_grad_(False)


def mfd_loop(phi, a, b, eps=1e-5):
    """Reference MFD written with explicit loops over samples, tensors and channels."""
    out = []
    for i in range(a.shape[0]):
        fa, fb = phi.features(a[i:i + 1]), phi.features(b[i:i + 1])
        total = 0.0
        for la, lb in zip(fa, fb):
            for c in range(la.shape[1]):
                total += (((la[0, c] - lb[0, c]) ** 2).sum() + eps ** 2).sqrt() - eps
        out.append(total)
    return torch.stack(out)


def test_mfd_identities(phi):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    d = L.mfd(phi, a, b)
    assert d.shape == (5,)
    assert torch.allclose(L.mfd(phi, a, a), torch.zeros(5), atol=1e-6)
    assert torch.allclose(d, L.mfd(phi, b, a), rtol=1e-6)
    assert torch.allclose(d, mfd_loop(phi, a, b), rtol=1e-5)
    # per-tensor weights
    w = [1.0, 0.0, 2.0]
    fa, fb = phi.features(a), phi.features(b)
    manual = L.mfd_from_features([fa[0]], [fb[0]]) + 2 * L.mfd_from_features([fa[2]], [fb[2]])
    assert torch.allclose(L.mfd(phi, a, b, weights=w), manual, rtol=1e-6)
    with pytest.raises(ValueError):
        L.mfd(phi, a, b, weights=[1.0])


def test_batched_forward_equals_two_forwards(phi):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    separate = L.mfd_from_features(phi.features(a), phi.features(b))
    assert torch.allclose(L.mfd(phi, a, b), separate, rtol=1e-5, atol=1e-6)


def test_surrogate_gradient_is_weighted_normalised_mfd_gradient(phi):
    g = torch.Generator().manual_seed(3)
    B = 6
    D = torch.randn(B, 3, 8, 8, generator=g, requires_grad=True)
    D_r = torch.randn(B, 3, 8, 8, generator=g)
    w = torch.rand(B, generator=g) + 0.5
    dist = L.MFD(phi)
    direction = L.distance_direction(dist, D, D_r)
    assert torch.allclose(direction.flatten(1).norm(dim=1), torch.ones(B), atol=1e-5)
    # reference: the gradient of the mean MFD, normalised per sample
    D_ref = D.detach().clone().requires_grad_(True)
    G = torch.autograd.grad(mfd_loop(phi, D_ref, D_r).mean(), D_ref)[0]
    G_unit = G / G.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(direction, G_unit, atol=1e-5)
    L.direction_surrogate(D, direction, w).mean().backward()
    assert torch.allclose(D.grad, (w / B).view(-1, 1, 1, 1) * G_unit, atol=1e-6)


def test_frozen_net_required_and_no_param_grads(phi):
    with pytest.raises(ValueError, match="frozen"):
        L.MFD(TinyPhi())
    dist = L.MFD(phi).train()
    assert not phi.training       # MFD keeps phi in eval mode
    D = torch.randn(2, 3, 8, 8, requires_grad=True)
    L.distance_direction(dist, D, torch.randn(2, 3, 8, 8))
    assert all(p.grad is None for p in phi.parameters())


def test_normalize_guards_zero():
    g = torch.zeros(2, 3, 2, 2)
    assert torch.equal(L.normalize_per_sample(g), g)


def test_ect_mfd_ramp():
    assert L.ect_mfd_ramp(0, 5000) == pytest.approx(1 / 5000)
    assert L.ect_mfd_ramp(4999, 5000) == 1.0 and L.ect_mfd_ramp(10**6, 5000) == 1.0


def test_lpips_missing_package_gives_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "lpips":
            raise ImportError("No module named 'lpips'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"ayt\[lpips\]"):
        L.LPIPSDistance()


def test_distance_and_direction_returns_the_distance(phi):
    g = torch.Generator().manual_seed(4)
    D, D_r = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    d, direction = L.distance_and_direction(L.MFD(phi), D, D_r)
    assert torch.allclose(d, L.mfd(phi, D, D_r)) and not d.requires_grad
    assert torch.equal(direction, L.distance_direction(L.MFD(phi), D, D_r))
