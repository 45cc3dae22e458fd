"""ECT schedule, consistency step, EDM loss and samplers (docs/method.md sections 2 and 5)."""
import math

import pytest
import torch

from ayt import consistency as C
from ayt.losses import pseudo_huber


def test_r_mapping_hand_computed():
    t = torch.tensor([1.0, 0.5, 10.0])
    sig = lambda v: 1 / (1 + math.exp(-v))
    r = C.t_to_r(t, stage=0, q=256, k=8, b=1, mapping="sigmoid")
    expected = [tv * (1 - (1 + 8 * sig(-tv)) / 256) for tv in t.tolist()]
    assert torch.allclose(r, torch.tensor(expected), rtol=1e-6)
    assert r[0].item() == pytest.approx(0.98768949, rel=1e-6)  # 1 - (1 + 8 sigmoid(-1)) / 256
    r_const = C.t_to_r(t, stage=0, q=256, mapping="const")
    assert torch.allclose(r_const, t * (1 - 1 / 256))
    # official ECT: q = 2, stage 1 -> r = t (1 - 1/4)
    assert torch.allclose(C.t_to_r(t, stage=1, q=2, mapping="const"), 0.75 * t)
    # r is clamped at 0: q = 2, stage 0, small t -> 1 - (1 + 8 sigmoid(-t)) / 2 < 0
    assert C.t_to_r(torch.tensor([0.01]), stage=0, q=2, mapping="sigmoid").item() == 0.0


def test_stage_schedule_and_sampling():
    fixed = C.TRSchedule()
    assert C.stage_at(fixed, 0) == 0 and C.stage_at(fixed, 10**6) == 0
    ect = C.TRSchedule(q=2, double_every=100)
    assert [C.stage_at(ect, i) for i in (0, 99, 100, 250)] == [0, 0, 1, 2]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1, r1 = C.sample_t_r(fixed, 4096, 0, g1)
    t2, r2 = C.sample_t_r(fixed, 4096, 0, g2)
    assert torch.equal(t1, t2) and torch.equal(r1, r2)
    assert (r1 < t1).all() and (r1 >= 0).all()
    # ln t ~ N(P_mean, P_std^2)
    assert t1.log().mean().item() == pytest.approx(-1.1, abs=0.1)
    assert t1.log().std().item() == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ValueError, match="r-mapping"):
        C.TRSchedule(mapping="linear")


def test_weightings():
    t, r = torch.tensor([2.0]), torch.tensor([1.5])
    assert C.ect_weight(t, r).item() == pytest.approx(2.0)
    assert C.ect_weight(t, r, "sqrt").item() == pytest.approx(1 / math.sqrt(0.5))
    assert C.ect_weight(t, r, "karras").item() == pytest.approx(1 / 4 + 4)
    with pytest.raises(ValueError):
        C.ect_weight(t, r, "nope")


def test_pseudo_huber_c0_is_l2_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    assert torch.allclose(pseudo_huber(a, b, 0.0), (a - b).flatten(1).norm(dim=1))
    c = 0.03
    sq = (a - b).flatten(1).square().sum(1)
    assert torch.allclose(pseudo_huber(a, b, c), (sq + c * c).sqrt() - c)


class DropoutNet(torch.nn.Module):
    """A network f(x, sigma) with dropout that depends on sigma: f = dropout(W x) * (1 + sigma)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Conv2d(3, 3, 1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, sigma, labels=None):
        return self.drop(self.lin(x)) * (1 + sigma.view(-1, 1, 1, 1))


def test_shared_dropout_teacher_equals_student_at_r_equals_t():
    torch.manual_seed(0)
    net = DropoutNet().train()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 3, 4, 4, generator=g)
    eps = torch.randn(8, 3, 4, 4, generator=g)
    t = torch.rand(8, generator=g) + 0.1
    out = C.consistency_forward(net, x0, t, t.clone(), eps)
    assert torch.equal(out.D_t, out.D_r)           # same mask, same input -> identical
    assert (out.D_t == 0).any()                    # dropout was active
    assert out.D_t.requires_grad and not out.D_r.requires_grad
    # a second call draws a new mask (the RNG advanced once, through the teacher)
    out2 = C.consistency_forward(net, x0, t, t.clone(), eps)
    assert not torch.equal(out.D_t, out2.D_t)


def test_teacher_is_x0_where_r_is_zero_and_loss():
    net = lambda x, s, labels=None: 0.5 * x
    x0 = torch.ones(2, 1, 2, 2)
    eps = torch.zeros(2, 1, 2, 2)
    t, r = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.5])
    out = C.consistency_forward(net, x0, t, r, eps)
    assert torch.equal(out.D_r[0], x0[0]) and torch.allclose(out.D_r[1], 0.5 * x0[1])
    assert torch.allclose(out.w, torch.tensor([1.0, 2.0]))
    # D_t = 0.5: distances ||0.5 - 1|| * 2 = 1 and ||0.5-0.5|| = 0
    assert torch.allclose(C.ect_loss(out), torch.tensor([1.0, 0.0]))


def test_ect_gradient_is_weighted_unit_vector():
    """With c = 0, d mean_b(w_b ||D_b - D_r_b||) / dD_b = (w_b / B) * unit vector (docs/method.md section 4.1)."""
    g = torch.Generator().manual_seed(2)
    D = torch.randn(4, 3, 4, 4, generator=g, requires_grad=True)
    D_r = torch.randn(4, 3, 4, 4, generator=g)
    w = torch.rand(4, generator=g) + 0.5
    out = C.ConsistencyOutputs(D_t=D, D_r=D_r, t=w, r=w, w=w)
    C.ect_loss(out).mean().backward()
    norms = D.grad.flatten(1).norm(dim=1)
    assert torch.allclose(norms, w / 4, rtol=1e-5)


def test_edm_loss_weighting():
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, s, labels=None: torch.zeros_like(x)
    cfg = C.EDMLossConfig()
    loss = C.edm_loss(zero, x0, cfg, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (cfg.P_mean + cfg.P_std * torch.randn(6, generator=g)).exp()
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss, weight * x0.flatten(1).square().sum(1), rtol=1e-5)


def test_one_step_sampler_arithmetic():
    const = torch.full((2, 3, 4, 4), 0.3)
    net = lambda x, s, labels=None: const.clone()   # f(x, s) = 0.3
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = C.sample_1step(net, noise)
    # x = 80 n; x + (x - 0.3) / 80 * (0.002 - 80) = 0.3 (1 - 0.002/80) + 0.002 n
    assert torch.allclose(x, 0.3 * (1 - 0.002 / 80) + 0.002 * noise, atol=3e-5)


def test_two_step_sampler_arithmetic():
    seen = []

    def net(x, s, labels=None):
        seen.append(s[0].item())
        return torch.zeros_like(x)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = C.sample_2step(net, noise, generator=torch.Generator().manual_seed(9))
    assert seen == pytest.approx([80.0, 0.821])
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    x1 = 0.002 * noise                                        # after step 1 (D = 0)
    x1 = x1 + math.sqrt(0.821 ** 2 - 0.002 ** 2) * z          # re-noise to 0.821
    expected = x1 * (0.002 / 0.821)                           # step 2 with D = 0
    assert torch.allclose(x, expected, atol=1e-6)
    with pytest.raises(ValueError):
        C.consistency_sample(net, noise, (80.0, 0.001))


def test_heun_sampler_on_gaussian_data():
    """For data N(0, sd^2 I) the ideal denoiser is D(x, s) = x sd^2 / (s^2 + sd^2) and the PF-ODE
    maps x_T to x_T sqrt(s^2 + sd^2) / sqrt(T^2 + sd^2). Heun converges there at second order."""
    sd = 0.5
    net = lambda x, s, labels=None: x * sd ** 2 / (s.view(-1, 1, 1, 1) ** 2 + sd ** 2)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = noise * 80 * sd / math.sqrt(80 ** 2 + sd ** 2)
    err = {n: ((C.edm_heun_sample(net, noise, num_steps=n) - expected).abs().max() / expected.abs().max()).item()
           for n in (18, 36, 200)}
    assert err[18] < 0.06 and err[200] < 1e-3
    assert err[18] / err[36] > 3.0   # halving the step size cuts the error ~4x (2nd order)
    sig = C.edm_sigmas(18)
    assert sig[0].item() == pytest.approx(80) and sig[-2].item() == pytest.approx(0.002) and sig[-1] == 0
