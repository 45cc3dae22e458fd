"""Batched sampling and the in-memory FID path without a host round trip per batch: the network runs
on slices of the batch on the CPU with bitwise the same samples, and non-finite samples or features are
still refused, once, at the end."""
import numpy as np
import pytest
import torch

from ayt import consistency as C
from ayt import fid
from ayt.networks import build_network
from ayt.sampling import CPU_CHUNK, chunked, generate_batch


@pytest.mark.parametrize("label_dim", [0, 3])
@pytest.mark.parametrize("stage,steps", [("consistency", 1), ("consistency", 2), ("diffusion", 1)])
def test_chunked_sampling_is_bitwise_the_whole_batch(stage, steps, label_dim):
    torch.manual_seed(0)
    net = build_network("tiny", img_resolution=8, img_channels=3, label_dim=label_dim).eval()
    n = CPU_CHUNK + 5  # two slices, the second one short
    g = torch.Generator().manual_seed(1)
    a = generate_batch(net, stage, n, 3, 8, label_dim, g, "cpu", steps)
    # the same draws, the network on the whole batch
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, 3, 8, 8, generator=g)
    labels = (torch.nn.functional.one_hot(torch.randint(label_dim, (n,), generator=g), label_dim).float()
              if label_dim else None)
    with torch.no_grad():
        if stage == "diffusion":
            b = C.edm_heun_sample(net, noise, class_labels=labels)
        else:
            b = C.consistency_sample(net, noise, (C.SIGMA_MAX, C.SIGMA_MID)[:steps], class_labels=labels, generator=g)
    assert torch.equal(a, b.clamp(-1, 1))


def test_chunked_passes_scalar_sigma_and_shared_labels():
    calls = []

    def net(x, sigma, labels=None):
        calls.append((x.shape[0], torch.as_tensor(sigma).ndim, None if labels is None else labels.shape[0]))
        return x * 2
    x = torch.randn(5, 2, 1, 1)
    out = chunked(net, 2)(x, 3.0, torch.ones(1, 4))
    assert torch.equal(out, x * 2) and calls == [(2, 0, 1), (2, 0, 1), (1, 0, 1)]
    assert chunked(net, None) is net


def test_fid_from_generator_refuses_non_finite_samples_once_at_the_end():
    calls = []

    def sample_fn(i, n):
        calls.append(i)
        x = torch.zeros(n, 3, 8, 8)
        if i == 0:
            x[0, 0, 0, 0] = float("nan")
        return x
    feats = lambda u: u.float().flatten(1)[:, :4] + torch.arange(u.shape[0])[:, None].float()  # noqa: E731
    with pytest.raises(ValueError, match="1 NaN or inf"):
        fid.fid_from_generator(sample_fn, 6, 2, np.zeros(4), np.eye(4), extractor=feats)
    assert calls == [0, 1, 2]  # no host round trip per batch: the check comes after the last batch


def test_feature_stats_deferred_check():
    stats = fid.FeatureStats(3)
    stats.update(torch.randn(4, 3), check=False)
    stats.update(torch.full((2, 3), float("inf")), check=False)
    assert stats.n == 6
    with pytest.raises(ValueError, match="6 non-finite"):
        stats.mean()
    with pytest.raises(ValueError, match="non-finite"):
        stats.cov()
    other = fid.FeatureStats(3)
    other.update(torch.randn(5, 3), check=False)
    other.update(torch.randn(5, 3))
    assert other.mean().shape == (3,)
