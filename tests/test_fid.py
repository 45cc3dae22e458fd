"""Tests for ayt.fid: Frechet distance identities, streaming statistics, the pytorch-fid Inception
layout and preprocessing, EDM's PNG quantisation, weight lookup and the FID drivers."""

import os
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import inception as tv_inception

from ayt import fid

# ----------------------------------------------------------------------------------------------
# Frechet distance.


def _closed_form(mu1, a, mu2, b):
    """FD for commuting covariances Q diag(a) Q^T, Q diag(b) Q^T."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def _random_cov(rng, d, rank=None):
    x = rng.standard_normal((rank or 2 * d, d))
    return np.cov(x, rowvar=False)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-10, abs=1e-10)


def test_frechet_commuting_rank_deficient_closed_form():
    rng = np.random.default_rng(1)
    d = 24
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    a[:8] = 0  # S1 has rank 16
    b[4:10] = 0  # S2 has rank 18; supports overlap partially
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = _closed_form(mu1, a, mu2, b)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-8)


def test_frechet_symmetric_and_matches_pytorch_fid_sqrtm():
    rng = np.random.default_rng(2)
    d = 32
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    fd12 = fid.frechet_distance(mu1, s1, mu2, s2)
    fd21 = fid.frechet_distance(mu2, s2, mu1, s1)
    assert fd12 == pytest.approx(fd21, rel=1e-10)
    # pytorch-fid's formula, written out independently with scipy.
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert fd12 == pytest.approx(ref, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-10)


def test_frechet_zero_for_identical_stats_even_rank_deficient():
    rng = np.random.default_rng(3)
    d = 48
    s = _random_cov(rng, d, rank=20)  # rank 19 < d
    assert np.linalg.matrix_rank(s) < d
    mu = rng.standard_normal(d)
    fd = fid.frechet_distance(mu, s, mu, s)
    assert abs(fd) < 1e-9 * np.trace(s)


def test_frechet_rejects_bad_input():
    d = 4
    mu, s = np.zeros(d), np.eye(d)
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu, bad, mu, s)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu + np.inf, s, mu, s)
    with pytest.raises(ValueError, match="positive semi-definite"):
        fid.frechet_distance(mu, np.diag([1.0, 1.0, 1.0, -1.0]), mu, s)
    with pytest.raises(ValueError, match="dims differ"):
        fid.frechet_distance(mu, s, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu, s, mu, s, method="svd")


# ----------------------------------------------------------------------------------------------
# Streaming statistics and npz files.


def test_feature_stats_streaming_equals_numpy_one_shot():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(103, 7, generator=g) * torch.linspace(0.1, 5, 7) + 3.0
    stats = fid.FeatureStats(7)
    for chunk in feats.split([1, 40, 2, 60]):
        stats.update(chunk)
    x = feats.double().numpy()
    assert stats.n == 103
    np.testing.assert_allclose(stats.mean(), np.mean(x, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    # merging two accumulators equals one accumulator over all rows
    a, b = fid.FeatureStats(7), fid.FeatureStats(7)
    a.update(feats[:50])
    b.update(feats[50:])
    a.merge(b)
    np.testing.assert_allclose(a.cov(), stats.cov(), rtol=1e-12, atol=1e-13)
    # without torch.distributed, all_reduce is the identity
    np.testing.assert_allclose(a.all_reduce().mean(), stats.mean(), rtol=0, atol=0)


def test_feature_stats_rejects_bad_input():
    stats = fid.FeatureStats(3)
    with pytest.raises(ValueError):
        stats.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.full((2, 3), float("nan")))
    stats.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov()


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), _random_cov(rng, 5)
    path = tmp_path / "sub" / "ref-stats"  # no .npz suffix: the name is kept as given
    fid.save_stats(path, mu, sigma)
    assert os.path.isfile(path)
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]
    mu2, sigma2 = fid.load_stats(path)
    assert mu2.dtype == np.float64 and sigma2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # also reads a pytorch-fid style file (savez_compressed, float32)
    other = tmp_path / "pf.npz"
    np.savez_compressed(other, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, _ = fid.load_stats(other)
    np.testing.assert_allclose(mu3, mu, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Quantisation.


def _edm_png_round_trip(x: torch.Tensor, tmp_path) -> torch.Tensor:
    """EDM generate.py: quantise, HWC numpy, PIL PNG on disk, read back (pytorch-fid's reader)."""
    arr = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for i, a in enumerate(arr):
        path = tmp_path / f"{i:06d}.png"
        Image.fromarray(a, "RGB").save(path)
        out.append(np.array(Image.open(path).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def test_quantize_equals_png_round_trip_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2.4 - 1.2  # includes out-of-range values
    # values at the quantisation boundaries: k/127.5 - 128/127.5 + 0.5/127.5 etc.
    x[0, 0, 0, :] = torch.tensor([-1.0, 1.0, 0.0, -1 / 255, 1 / 255, 0.5 / 127.5, -0.5 / 127.5, 0.996])
    u = fid.quantize(x)
    assert u.dtype == torch.uint8 and u.shape == x.shape
    assert torch.equal(u, _edm_png_round_trip(x, tmp_path))
    assert u.min() == 0 and u.max() == 255
    # [-1, 1] images that came from uint8 data map back to the same integers
    v = torch.randint(0, 256, (2, 3, 5, 5), generator=g, dtype=torch.uint8)
    assert torch.equal(fid.quantize(v.float() / 127.5 - 1), v)


def test_quantize_rejects_nan_and_integers():
    with pytest.raises(ValueError, match="NaN"):
        fid.quantize(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError):
        fid.quantize(torch.zeros(2, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# Inception network.

# (key, shape) pairs of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, i.e. of torchvision's
# Inception3(num_classes=1008, aux_logits=False).
KNOWN_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.bias": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6e.branch7x7_2.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return fid.InceptionV3FID().eval()


def test_inception_state_dict_layout(inception):
    sd = inception.state_dict()
    for key, shape in KNOWN_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)
    tv = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert list(sd) == list(tv)  # same keys, same order: strict loading of pytorch-fid's file
    assert all(sd[k].shape == tv[k].shape for k in sd)
    params = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert len(params) == 472
    bn = inception.Conv2d_1a_3x3.bn
    assert bn.eps == 1e-3


def test_inception_output_shape_and_input_paths(inception):
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        f_u8 = inception(u)
        f_float = inception(u.float() / 127.5 - 1)
    assert f_u8.shape == (2, 2048) and f_u8.dtype == torch.float32
    assert torch.isfinite(f_u8).all()
    torch.testing.assert_close(f_float, f_u8, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        inception(torch.zeros(2, 2, 32, 32))
    grey = u[:, :1]
    torch.testing.assert_close(fid.InceptionV3FID.preprocess(grey),
                               fid.InceptionV3FID.preprocess(grey.expand(-1, 3, -1, -1)), rtol=0, atol=0)


def test_preprocess_matches_pytorch_fid_png_pipeline(tmp_path):
    """pytorch-fid: PIL -> ToTensor ([0,1]) -> bilinear 299 (align_corners=False) -> 2x - 1."""
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    png = _edm_png_round_trip(x, tmp_path)
    ref = torch.stack([TF.to_tensor(Image.open(tmp_path / f"{i:06d}.png").convert("RGB")) for i in range(2)])
    ref = 2 * F.interpolate(ref, size=(299, 299), mode="bilinear", align_corners=False) - 1
    ours = fid.InceptionV3FID.preprocess(fid.quantize(x))
    assert torch.equal(png, fid.quantize(x))
    assert torch.equal(ours, ref)


def test_fid_blocks_use_tf_pooling():
    """A/C/7b average-pool without counting the padding; 7c (E_2) max-pools."""
    torch.manual_seed(0)
    net = fid.InceptionV3FID().eval()
    with torch.no_grad():
        for name, pool_ch, pool in [("Mixed_5b", 32, "avg"), ("Mixed_6b", 192, "avg"),
                                    ("Mixed_7b", 192, "avg"), ("Mixed_7c", 192, "max")]:
            block = getattr(net, name)
            c_in = block.branch_pool.conv.in_channels
            x = torch.randn(1, c_in, 5, 5)
            if pool == "avg":
                p = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
            else:
                p = F.max_pool2d(x, 3, 1, 1)
            torch.testing.assert_close(block(x)[:, -pool_ch:], block.branch_pool(p))
            # and it differs from torchvision's standard pooling at the border
            p_tv = F.avg_pool2d(x, 3, 1, 1)
            assert not torch.allclose(block(x)[:, -pool_ch:], block.branch_pool(p_tv))


# ----------------------------------------------------------------------------------------------
# Weights lookup.


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """An empty hub dir, no env var and no network."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(fid.WEIGHTS_ENV_VAR, raising=False)
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append((url, dst))
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub, calls


def _pytorch_fid_style_file(path):
    """A weights file with pytorch-fid's keys (no num_batches_tracked buffers), random values."""
    torch.manual_seed(3)
    sd = {k: v for k, v in fid.InceptionV3FID().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, path)
    return sd


def test_load_inception_offline_raises_with_path_and_url(no_weights):
    hub, calls = no_weights
    expected = os.path.join(str(hub), "checkpoints", "pt_inception-2015-12-05-6726825d.pth")
    assert fid.default_weights_path() == expected
    with pytest.raises(fid.WeightsNotFoundError) as info:
        fid.load_inception()
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert expected in msg and fid.FID_WEIGHTS_URL in msg and fid.WEIGHTS_ENV_VAR in msg
    assert calls == [(fid.FID_WEIGHTS_URL, expected)]  # tried to download exactly once
    with pytest.raises(fid.WeightsNotFoundError, match="download disabled"):
        fid.load_inception(download=False)
    assert len(calls) == 1
    with pytest.raises(fid.WeightsNotFoundError, match="nope.pth"):
        fid.load_inception(weights=str(hub / "nope.pth"))


def test_load_inception_lookup_order(no_weights, tmp_path, monkeypatch):
    hub, calls = no_weights
    # 1. explicit path; strict loading of a file without num_batches_tracked buffers
    explicit = tmp_path / "w.pth"
    sd = _pytorch_fid_style_file(explicit)
    net = fid.load_inception(weights=explicit)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net.state_dict()["fc.weight"], sd["fc.weight"])
    # 2. environment variable
    monkeypatch.setenv(fid.WEIGHTS_ENV_VAR, str(explicit))
    fid.load_inception()
    monkeypatch.setenv(fid.WEIGHTS_ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(fid.WeightsNotFoundError, match="missing.pth"):
        fid.load_inception()
    monkeypatch.delenv(fid.WEIGHTS_ENV_VAR)
    # 3. a successful download lands in the hub cache and is reused afterwards
    def fake_download(url, dst, *args, **kwargs):
        calls.append((url, dst))
        _pytorch_fid_style_file(dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    fid.load_inception()
    fid.load_inception()
    assert calls == [(fid.FID_WEIGHTS_URL, fid.default_weights_path())]
    # a file with a wrong layout is refused by the strict load
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        fid.load_inception(weights=bad)


# ----------------------------------------------------------------------------------------------
# Drivers.


class _PixelFeatures(torch.nn.Module):
    """A tiny deterministic feature map for driver tests: uint8 [N,3,8,8] -> [N, 6]."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 6)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)  # identical in every process

    def forward(self, u):
        assert u.dtype == torch.uint8  # drivers quantise first
        x = F.avg_pool2d(u.float() / 127.5 - 1, 4).flatten(1)  # [N, 12]
        return self.proj(x)


def _sample_fn(b, size):
    g = torch.Generator().manual_seed(1000 + b)
    return torch.rand(size, 3, 8, 8, generator=g) * 2 - 1


def test_compute_stats_inputs_agree():
    feat = _PixelFeatures()
    images = torch.cat([_sample_fn(b, 10) for b in range(3)])  # [30, 3, 8, 8]
    mu, sigma = fid.compute_stats(images, feat, batch_size=7)
    f = feat(fid.quantize(images)).double().detach().numpy()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-6, atol=1e-9)
    ds = torch.utils.data.TensorDataset(images, torch.zeros(30))
    mu2, sigma2 = fid.compute_stats(ds, feat, batch_size=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=11)
    mu3, sigma3 = fid.compute_stats(loader, feat)
    for m, s in [(mu2, sigma2), (mu3, sigma3)]:
        np.testing.assert_allclose(m, mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(s, sigma, rtol=1e-6, atol=1e-9)


def test_reference_stats_caches(tmp_path):
    feat = _PixelFeatures()
    images = _sample_fn(0, 20)
    path = tmp_path / "ref.npz"
    mu, sigma = fid.reference_stats(images, path, feature_fn=feat, batch_size=8)
    assert path.is_file()

    def boom(_):
        raise AssertionError("must not recompute")

    mu2, sigma2 = fid.reference_stats(images, path, feature_fn=boom)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


def test_fid_from_generator_equals_stats_of_the_same_samples():
    feat = _PixelFeatures()
    n, bs = 23, 5  # last batch is short
    images = torch.cat([_sample_fn(b, min(bs, n - b * bs)) for b in range((n + bs - 1) // bs)])
    ref_mu, ref_sigma = fid.compute_stats(_sample_fn(99, 40), feat)
    got = fid.fid_from_generator(_sample_fn, n, bs, ref_mu, ref_sigma, extractor=feat)
    mu, sigma = fid.compute_stats(images, feat)
    assert got == pytest.approx(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma), rel=1e-9)
    assert got > 0
    with pytest.raises(ValueError, match="returned"):
        fid.fid_from_generator(lambda b, s: _sample_fn(b, s + 1), n, bs, ref_mu, ref_sigma, extractor=feat)


def _dist_worker(rank, world, init_file, n, bs, ref_mu, ref_sigma, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        value = fid.fid_from_generator(_sample_fn, n, bs, ref_mu, ref_sigma, extractor=_PixelFeatures())
        images = torch.cat([_sample_fn(b, 4) for b in range(3)])
        mu, _ = fid.compute_stats(images, _PixelFeatures(), batch_size=4)  # 3 batches over 2 ranks
        np.save(f"{out}.{rank}.npy", np.concatenate([[value], mu]))
    finally:
        torch.distributed.destroy_process_group()


def test_fid_from_generator_two_processes_matches_one(tmp_path):
    import torch.multiprocessing as mp

    feat = _PixelFeatures()
    n, bs = 23, 5
    ref_mu, ref_sigma = fid.compute_stats(_sample_fn(99, 40), feat)
    want = fid.fid_from_generator(_sample_fn, n, bs, ref_mu, ref_sigma, extractor=feat)
    want_mu, _ = fid.compute_stats(torch.cat([_sample_fn(b, 4) for b in range(3)]), feat)
    out = str(tmp_path / "res")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), n, bs, ref_mu, ref_sigma, out), nprocs=2)
    for rank in range(2):
        res = np.load(f"{out}.{rank}.npy")
        assert res[0] == pytest.approx(want, rel=1e-9)
        np.testing.assert_allclose(res[1:], want_mu, rtol=1e-9, atol=1e-12)
