"""The device paths on CUDA (marker `cuda`; skipped without a GPU): each result on the GPU equals the
CPU's to float32 kernel rounding (TF32 off), and the GPU-only mechanisms (shared dropout masks through
the CUDA RNG, training with resume) behave as on the CPU. `benchmarks/gpu_check.py` runs this file."""
import numpy as np
import pytest
import torch

from ayt import consistency as C
from ayt import fid
from ayt.features import build_feature_net, freeze
from ayt.losses import MFD, distance_and_direction
from ayt.networks import build_network

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Plain float32 on the GPU, so that CPU and GPU differ only by kernel rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def close(a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a.detach().cpu().double(), b.detach().cpu().double(), rtol=rtol, atol=atol)


def tiny_net(dropout=0.0):
    torch.manual_seed(0)
    return build_network("tiny", img_resolution=16, img_channels=3, dropout=dropout)


def test_consistency_step_cuda_equals_cpu():
    net_cpu = tiny_net().train()
    net_gpu = tiny_net().train().to(CUDA)
    g = torch.Generator().manual_seed(1)
    x_0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    t, r = C.sample_t_r(C.TRSchedule(), 4, 0, g)
    eps = torch.randn(x_0.shape, generator=g)
    losses, grads = [], []
    for net, dev in ((net_cpu, "cpu"), (net_gpu, CUDA)):
        out = C.consistency_forward(net, x_0.to(dev), t.to(dev), r.to(dev), eps.to(dev))
        loss = C.ect_loss(out).mean()
        loss.backward()
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten().cpu() for p in net.parameters()]))
    close(losses[1], losses[0])
    close(grads[1], grads[0], rtol=1e-3, atol=1e-6)


def test_shared_dropout_mask_through_cuda_rng():
    net = tiny_net(dropout=0.5).train().to(CUDA)
    x_0 = torch.rand(3, 3, 16, 16, device=CUDA) * 2 - 1
    t = torch.tensor([0.5, 1.0, 2.0], device=CUDA)
    eps = torch.randn_like(x_0)
    torch.manual_seed(5)
    out = C.consistency_forward(net, x_0, t, t, eps)  # r = t: the teacher must reproduce the student
    assert torch.equal(out.D_t.detach(), out.D_r)


def test_samplers_on_cuda():
    net = tiny_net().eval()
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # The 1-step sampler computes x_T + (x_T - D)/80 * (0.002 - 80) with x_T = 80 eps: x_T cancels, so the
    # result carries float32 rounding of |x_T| (up to a few hundred; measured on an H200: 3.05e-5 = one ulp
    # at 256-512). The bound is four ulps of max |x_T|.
    atol = 4 * torch.finfo(torch.float32).eps * float((80 * noise).abs().max())
    close(C.sample_1step(net.to(CUDA), noise.to(CUDA)), C.sample_1step(net.cpu(), noise), atol=atol)
    net = net.to(CUDA)
    a = C.sample_2step(net, noise.to(CUDA), generator=torch.Generator(CUDA).manual_seed(3))
    b = C.sample_2step(net, noise.to(CUDA), generator=torch.Generator(CUDA).manual_seed(3))
    assert a.device.type == CUDA.type and torch.equal(a, b) and torch.isfinite(a).all()


def test_mfd_and_direction_cuda_equal_cpu():
    torch.manual_seed(0)
    phi = freeze(build_feature_net("mini-vgg", resolution=16, in_channels=3, num_outputs=15))
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    d_cpu, g_cpu = distance_and_direction(MFD(phi), a, b)
    d_gpu, g_gpu = distance_and_direction(MFD(phi.to(CUDA)), a.to(CUDA), b.to(CUDA))
    close(d_gpu, d_cpu)
    close(g_gpu, g_cpu, rtol=1e-3, atol=1e-5)


def test_fid_features_and_stats_on_cuda():
    torch.manual_seed(0)
    net = fid.InceptionV3FID().eval().requires_grad_(False)  # random weights
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    u = fid.quantize(x)
    f_cpu = net(u)
    f_gpu = net.to(CUDA)(u.to(CUDA))
    close(f_gpu, f_cpu, rtol=1e-3, atol=1e-4)
    # in memory on the GPU, batch by batch, equals the statistics of all features at once
    mu_ref, sigma_ref = np.zeros(fid.FEATURE_DIM), np.eye(fid.FEATURE_DIM)
    value = fid.fid_from_generator(lambda i, n: x[2 * i:2 * i + n].to(CUDA), 6, 2, mu_ref, sigma_ref,
                                   extractor=net, device=CUDA)
    f = f_gpu.double().cpu().numpy()
    direct = fid.frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu_ref, sigma_ref)
    assert value == pytest.approx(direct, rel=1e-6)


def test_training_two_steps_and_resume_on_cuda(tmp_path):
    from ayt import checkpoint as ck
    from ayt.config import make_config
    from ayt.train import train
    base = {"stage": "diffusion", "data.name": "shapes", "data.resolution": 16, "data.num_images": 64,
            "net.arch": "tiny", "batch": 4, "iters": 2, "log_every": 1, "ckpt_every": 1, "sample_every": 0,
            "device": "cuda", "run_root": str(tmp_path), "log.tensorboard": False}
    straight = train(make_config(None, {**base, "name": "straight"}))
    resumed = make_config(None, {**base, "name": "resumed"})
    train(resumed, stop_after=1)
    train(resumed, resume=True)
    a = ck.load_checkpoint(ck.resolve_checkpoint(straight))
    b = ck.load_checkpoint(ck.resolve_checkpoint(tmp_path / "resumed"))
    assert a["iteration"] == b["iteration"] == 2
    for k in a["model"]:
        # same kernels in one process: equal up to the nondeterminism of cuDNN's backward kernels
        close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["ect", "mfd"])
def test_training_step_makes_no_host_sync(mode):
    """ayt.train.train_step without the NaN check (nan_check_every > 1) never waits for the GPU:
    CUDA's sync debug mode turns any synchronising call into an error."""
    from ayt.config import make_config
    from ayt.objectives import ConsistencyObjective
    from ayt.train import Dist, NonFiniteWatch, make_optimizer, step_networks, train_step
    cfg = make_config(None, {"net.arch": "tiny", "data.resolution": 16, "batch": 4, "device": "cuda",
                             "nan_check_every": 1000, "ct.mode": "ect"})
    model = tiny_net(dropout=0.1).train().to(CUDA)
    ema = tiny_net().eval().requires_grad_(False).to(CUDA)
    opt = make_optimizer(cfg, model.parameters())
    distance = None
    if mode == "mfd":
        torch.manual_seed(0)
        distance = MFD(freeze(build_feature_net("mini-vgg", resolution=16, in_channels=3, num_outputs=15)).to(CUDA))
    obj = ConsistencyObjective(C.TRSchedule(), mode, distance=distance)
    x_0 = torch.rand(4, 3, 16, 16, device=CUDA) * 2 - 1
    d, watch = Dist(device=CUDA), NonFiniteWatch(CUDA)
    nets = step_networks(cfg, model, model)
    train_step(cfg, d, 0, nets, model, ema, obj, opt, lambda: (x_0, None), 1, watch, check=True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in (1, 2):
            train_step(cfg, d, it, nets, model, ema, obj, opt, lambda: (x_0, None), 1, watch, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watch.check(d, 2, {}, updated=True, last_ckpt=lambda: None)  # the deferred check: all finite
