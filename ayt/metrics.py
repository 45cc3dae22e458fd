"""Small-scale sample-quality metrics for runs where Inception weights are unavailable.

These are measurement instruments for the built-in data and other small experiments, not quantities
from the paper; FID (docs/method.md section 5.2) lives in `ayt.fid`.

  ShapesEvaluator / train_evaluator   a small CNN regressing the shapes' generating parameters;
                                      its penultimate layer is the feature space of FD_eval
  ClassifierEvaluator                 the same CNN classifying labelled data (photo source ids,
                                      class folders, MNIST/CIFAR-10 classes); FD_eval in its features
  frechet_feature_distance            "FD_eval": the Frechet distance on evaluator features
  precision_recall                    improved precision/recall (Kynkaanniemi et al. 2019)
  swd_multiscale                      ProGAN's multi-scale sliced Wasserstein distance over
                                      Laplacian-pyramid patches (no network, no weights)
  sliced_wasserstein                  pixel-space sliced Wasserstein distance
  shapes_manifold_error               RMSE between an image and its best re-rendering by
                                      `ayt.data.render_shapes` (distance to the data manifold)

Everything is pure math on tensors except the evaluator; features are compared in float64.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fid
from .progress import progress

__all__ = [
    "ShapesEvaluator",
    "ClassifierEvaluator",
    "load_evaluator",
    "classifier_accuracy",
    "train_evaluator",
    "evaluator_loss",
    "frechet_feature_distance",
    "precision_recall",
    "sliced_wasserstein",
    "swd_multiscale",
    "swd_resolutions",
    "laplacian_pyramid",
    "pyr_down",
    "pyr_up",
    "patch_descriptors",
    "normalize_descriptors",
    "sliced_wasserstein_1",
    "shapes_manifold_error",
]


# ----------------------------------------------------------------------------------------------
# Evaluator networks.


def _as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (e.g. `fid.quantize` output) or float [-1, 1] -> float32 [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating-point images, got {x.dtype}")
    return x.to(torch.float32)


class _EvaluatorCNN(nn.Module):
    """The evaluator trunk shared by both tasks; `features` is its penultimate layer.

    Architecture: len(channels) stages of [conv3x3 -> GroupNorm(8) -> SiLU -> 2x2 avg-pool (while
    the map is at least 2x2)], global average pool, Linear(C, feature_dim) -> SiLU (= features),
    Linear(feature_dim, n_out) (= head). Defaults: ~260k parameters, 128-d features, any resolution.
    Input: images [N, C, H, W], uint8 or float in [-1, 1].
    """

    def __init__(self, n_out: int, in_channels: int, channels: tuple[int, ...], feature_dim: int) -> None:
        super().__init__()
        if n_out < 1 or feature_dim < 1 or not channels:
            raise ValueError("the output width, feature_dim and channels must be positive/non-empty")
        self.stages = nn.ModuleList()
        c_prev = in_channels
        for c in channels:
            self.stages.append(nn.Sequential(
                nn.Conv2d(c_prev, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()))
            c_prev = c
        self.fc = nn.Linear(c_prev, feature_dim)
        self.head = nn.Linear(feature_dim, n_out)
        self.meta: dict = {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> penultimate features [N, feature_dim]."""
        x = _as_float_images(images)
        for stage in self.stages:
            x = stage(x)
            if min(x.shape[-2:]) >= 2:
                x = F.avg_pool2d(x, 2)
        return F.silu(self.fc(x.mean((-2, -1))))

    def save(self, path: str | os.PathLike) -> None:
        """torch.save({'kind', 'kwargs', 'state_dict', 'meta'}); reload with `load` or `load_evaluator`."""
        torch.save({"kind": type(self).__name__, "kwargs": self.kwargs, "state_dict": self.state_dict(),
                    "meta": dict(self.meta)}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> "_EvaluatorCNN":
        """Rebuild from `save` output (strict), in eval mode without gradients."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        net = cls(**blob["kwargs"])
        net.load_state_dict(blob["state_dict"], strict=True)
        net.meta = dict(blob.get("meta", {}))
        return net.eval().requires_grad_(False)


class ShapesEvaluator(_EvaluatorCNN):
    """A small CNN that regresses generating parameters (the shapes data's evaluator).

    Predictions are in the original parameter units: the head predicts standardised parameters
    and `forward` undoes the standardisation with the buffers `param_mean`, `param_std`
    (set by `train_evaluator`).
    """

    def __init__(
        self,
        n_params: int,
        in_channels: int = 3,
        channels: tuple[int, ...] = (32, 64, 128, 128),
        feature_dim: int = 128,
    ) -> None:
        if n_params < 1:
            raise ValueError("n_params must be positive")
        super().__init__(n_params, in_channels, tuple(channels), feature_dim)
        self.kwargs = dict(n_params=n_params, in_channels=in_channels, channels=tuple(channels),
                           feature_dim=feature_dim)
        self.register_buffer("param_mean", torch.zeros(n_params))
        self.register_buffer("param_std", torch.ones(n_params))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> predicted parameters [N, n_params] (original units)."""
        return self.head(self.features(images)) * self.param_std + self.param_mean

    def loss(self, images: torch.Tensor, params: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Squared error of the standardised predictions (the training loss): the mean over all entries
        (reduction='mean'), or per image [N] (reduction='none')."""
        target = (params.to(torch.float32) - self.param_mean) / self.param_std
        err = (self.head(self.features(images)) - target).square()
        return err.mean() if reduction == "mean" else err.mean(1)


class ClassifierEvaluator(_EvaluatorCNN):
    """The same small CNN as a classifier (labelled data: photo source ids, class folders, MNIST/CIFAR-10
    classes); `forward` returns logits [N, n_classes]; FD_eval lives in its penultimate `features`."""

    def __init__(
        self,
        n_classes: int,
        in_channels: int = 3,
        channels: tuple[int, ...] = (32, 64, 128, 128),
        feature_dim: int = 128,
    ) -> None:
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        super().__init__(n_classes, in_channels, tuple(channels), feature_dim)
        self.kwargs = dict(n_classes=n_classes, in_channels=in_channels, channels=tuple(channels),
                           feature_dim=feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy: the batch mean (reduction='mean') or per image [N] (reduction='none')."""
        return F.cross_entropy(self(images), labels.to(torch.int64), reduction=reduction)


EVALUATOR_KINDS = {"ShapesEvaluator": ShapesEvaluator, "ClassifierEvaluator": ClassifierEvaluator}


def load_evaluator(path: str | os.PathLike, map_location: Any = "cpu") -> _EvaluatorCNN:
    """Load either evaluator from its file (files written before the 'kind' field are ShapesEvaluators)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    kind = blob.get("kind") or ("ClassifierEvaluator" if "n_classes" in blob.get("kwargs", {}) else "ShapesEvaluator")
    if kind not in EVALUATOR_KINDS:
        raise ValueError(f"{path}: unknown evaluator kind {kind!r}")
    return EVALUATOR_KINDS[kind].load(path, map_location)


def _reset_parameters(net: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Conv/Linear init (kaiming-uniform a=sqrt 5, uniform bias), drawn from `generator`."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(m.weight[0].numel())
            nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def evaluator_loss(evaluator: _EvaluatorCNN, images: torch.Tensor, targets: torch.Tensor,
                   batch_size: int = 512) -> float:
    """The training loss (standardised MSE, or cross-entropy for a classifier) over a set, no grad."""
    dev = evaluator.head.weight.device
    total, n = 0.0, images.shape[0]
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x, y = images[i:i + batch_size].to(dev), targets[i:i + batch_size].to(dev)
            total += float(evaluator.loss(x, y, reduction="none").sum())
    return total / n


def classifier_accuracy(evaluator: ClassifierEvaluator, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 512) -> float:
    """Fraction of images whose arg-max logit is their label."""
    dev = evaluator.head.weight.device
    hits = 0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            pred = evaluator(images[i:i + batch_size].to(dev)).argmax(1).cpu()
            hits += int((pred == labels[i:i + batch_size]).sum())
    return hits / max(1, images.shape[0])


def train_evaluator(
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> _EvaluatorCNN:
    """Train an evaluator on `images` [N, C, H, W] (uint8, or float in [-1, 1]).

    `targets` float [N, P]: a `ShapesEvaluator` regressing them (MSE of standardised parameters,
    per-column mean/std of `targets`; constant columns get std 1). `targets` int64 [N]: a
    `ClassifierEvaluator` over `max + 1` classes (cross-entropy). Adam; `seed` fixes the
    initialisation and the minibatch order; `kwargs` go to the constructor. Progress (rate, ETA) is
    reported through `ayt.progress`. Returns the network in eval mode without gradients.
    """
    classify = targets.ndim == 1 and not targets.is_floating_point()
    if images.shape[0] != targets.shape[0] or (not classify and targets.ndim != 2):
        raise ValueError(f"need images [N, ...] and params [N, P] or class labels [N], got "
                         f"{tuple(images.shape)}, {tuple(targets.shape)}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    if classify:
        y_all = targets.to(torch.int64)
        net: _EvaluatorCNN = ClassifierEvaluator(n_classes=int(y_all.max()) + 1, in_channels=images.shape[1], **kwargs)
        _reset_parameters(net, g)
    else:
        y_all = targets.to(torch.float32)
        net = ShapesEvaluator(n_params=targets.shape[1], in_channels=images.shape[1], **kwargs)
        _reset_parameters(net, g)
        std = y_all.std(0) if y_all.shape[0] > 1 else torch.ones(y_all.shape[1])
        net.param_mean.copy_(y_all.mean(0))
        net.param_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    net.to(device)
    dev = net.head.weight.device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    n = images.shape[0]
    for _ in progress(range(steps), desc="[evaluator] training", unit="step"):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        loss = net.loss(images[idx].to(dev), y_all[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Distribution metrics on features.


def frechet_feature_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """FD_eval: Frechet distance between Gaussians fitted to two feature sets [N, F] and [M, F].

    Same formula as FID (`fid.frechet_distance`, float64 mean and unbiased covariance), but on
    ShapesEvaluator features, so its values are not comparable with FID.
    """
    stats = []
    for f in (feats_a, feats_b):
        f = torch.as_tensor(f)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need features [N >= 2, F], got {tuple(f.shape)}")
        s = fid.FeatureStats(f.shape[1], device=f.device)
        s.update(f)
        stats.append((s.mean(), s.cov()))
    return fid.frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])


def _flat64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{name}: expected [N, ...], got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return x


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of x [N, D] to its k-th nearest other row (self excluded) -> [N]."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[i:i + batch_size], x)  # [b, N]; the self-distance 0 is the 1st smallest
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """For each query row: is it inside at least one ball B(ref_j, radii_j)? -> bool [Q]."""
    out = []
    for i in range(0, query.shape[0], batch_size):
        d = torch.cdist(query[i:i + batch_size], ref)  # [b, M]
        out.append((d <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(
    real_feats: torch.Tensor | np.ndarray,
    fake_feats: torch.Tensor | np.ndarray,
    k: int = 3,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019), in [0, 1].

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour within the set. precision = fraction of fake points inside the real
    manifold; recall = fraction of real points inside the fake manifold. Features [N, ...] are
    flattened and compared in float64 Euclidean distance, `batch_size` rows at a time.
    """
    real, fake = _flat64(real_feats, "real_feats"), _flat64(fake_feats, "fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"need 1 <= k < number of samples in each set, got k={k}")
    fake = fake.to(real.device)
    r_real = _knn_radii(real, k, batch_size)
    r_fake = _knn_radii(fake, k, batch_size)
    precision = _covered(fake, real, r_real, batch_size).double().mean().item()
    recall = _covered(real, fake, r_fake, batch_size).double().mean().item()
    return precision, recall


def _wasserstein_1d(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """Exact W_p^p between the empirical distributions of the rows of a [P, N] and b [P, M] (sorted).

    W_p^p = int_0^1 |Fa^-1(u) - Fb^-1(u)|^p du with piecewise-constant quantile functions that
    jump at u = i/N and u = j/M; integrated exactly over the merged breakpoints.
    """
    n, m = a.shape[1], b.shape[1]
    if n == m:
        d = (a - b).abs()
        return (d if p == 1 else d.pow(p)).mean(1)
    dt = a.dtype
    u = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=dt) / n, torch.arange(1, m + 1, dtype=dt) / m]))
    width = torch.diff(u, prepend=u.new_zeros(1))
    mid = u - width / 2
    ia = (mid * n).floor().long().clamp(max=n - 1).to(a.device)
    ib = (mid * m).floor().long().clamp(max=m - 1).to(a.device)
    return ((a[:, ia] - b[:, ib]).abs().pow(p) * width.to(a.device)).sum(1)


def sliced_wasserstein(
    a: torch.Tensor,
    b: torch.Tensor,
    n_projections: int = 128,
    generator: torch.Generator | None = None,
    p: float = 2.0,
) -> float:
    """Sliced Wasserstein distance SW_p = (E_theta W_p^p(theta.a, theta.b))^(1/p) on flattened pixels.

    a: [N, ...], b: [M, ...] (same trailing size; N != M allowed). theta: `n_projections`
    directions uniform on the unit sphere, drawn on the CPU from `generator`. The 1-D
    distances are exact (no resampling); computed in float64.
    """
    xa, xb = _flat64(a, "a"), _flat64(b, "b")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"sizes differ: {xa.shape[1]} vs {xb.shape[1]}")
    if n_projections < 1 or p < 1:
        raise ValueError(f"need n_projections >= 1 and p >= 1, got {n_projections}, {p}")
    theta = torch.randn(xa.shape[1], n_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(xa.device)
    pa = (xa @ theta).T.sort(dim=1).values  # [P, N]
    pb = (xb.to(xa.device) @ theta).T.sort(dim=1).values  # [P, M]
    return float(_wasserstein_1d(pa, pb, p).mean() ** (1 / p))


# ----------------------------------------------------------------------------------------------
# Multi-scale sliced Wasserstein distance over Laplacian-pyramid patches (Karras et al. 2018,
# "Progressive Growing of GANs", section 5 and appendix D): no network, no training, no weights.

# ProGAN's 5x5 Gaussian filter (binomial [1, 4, 6, 4, 1] / 16 in each direction, = cv2.pyrDown's).
_BINOMIAL5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16


def _blur5(x: torch.Tensor) -> torch.Tensor:
    """Depthwise 5x5 binomial filter of [N, C, H, W], border mirrored about the edge pixel
    ('reflect': d c b | a b c d | c b a, as scipy.ndimage's 'mirror' mode)."""
    k = torch.outer(_BINOMIAL5, _BINOMIAL5).to(x)
    c = x.shape[1]
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(pad, k.expand(c, 1, 5, 5), groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, H/2, W/2]: blur, keep every other pixel (cv2.pyrDown)."""
    return _blur5(x)[..., ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, 2H, 2W]: zeros between the pixels, blur with 4x the filter (cv2.pyrUp)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return 4 * _blur5(up)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian pyramid of [N, C, R, R], finest first: ``levels - 1`` band-pass images
    ``G_l - pyr_up(G_{l+1})`` at R, R/2, ..., then the low-pass ``G_{levels-1}`` (G_0 = x)."""
    pyramid = [x]
    for _ in range(1, levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - pyr_up(pyramid[-1])
    return pyramid


def swd_resolutions(resolution: int, min_resolution: int | None = None) -> list[int]:
    """The pyramid levels' resolutions, finest first: R, R/2, ... down to ``min_resolution``
    (default: 16, ProGAN's smallest level; at R = 16 (or 8) the smallest level >= 8 px, so that a
    16 px image still has two levels)."""
    if min_resolution is None:
        min_resolution = min(16, max(8, resolution // 2))
    if resolution < 7:
        raise ValueError(f"SWD needs images of at least 7x7 (its patches are 7x7), got {resolution}")
    out, r = [], resolution
    while r >= min_resolution and r >= 7:
        out.append(r)
        r //= 2
    return out


def patch_descriptors(level: torch.Tensor, corners: torch.Tensor, size: int = 7, chunk: int = 256) -> torch.Tensor:
    """The ``size`` x ``size`` neighbourhoods of a pyramid level.

    level: [N, C, H, W]; corners: int64 [N, P, 2], the (row, column) of each patch's top-left pixel in
    [0, H - size] x [0, W - size]. Returns [N * P, C, size, size] (image-major order). Gathered from
    ``F.unfold`` (every neighbourhood of ``chunk`` images at a time).
    """
    n, c, h, w = level.shape
    p = corners.shape[1]
    pos = (corners[..., 0] * (w - size + 1) + corners[..., 1]).to(level.device)  # [N, P] index into unfold
    out = []
    for i in range(0, n, chunk):
        cols = F.unfold(level[i:i + chunk], size)  # [b, C*size*size, (H-size+1)*(W-size+1)]
        idx = pos[i:i + chunk, None, :].expand(-1, cols.shape[1], -1)
        out.append(cols.gather(2, idx).transpose(1, 2))  # [b, P, C*size*size]
    return torch.cat(out).reshape(n * p, c, size, size)


def normalize_descriptors(desc: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[M, C, s, s] -> [M, C*s*s]: each channel standardised by the mean and (population) standard
    deviation of that set's patches over all its pixels (ProGAN's ``finalize_descriptors``). A constant
    channel (std 0) is divided by ``eps`` instead (ProGAN would give NaN)."""
    m, c = desc.shape[:2]
    flat = desc.reshape(m, c, -1)
    std, mean = torch.std_mean(flat.transpose(0, 1).reshape(c, -1), dim=1, unbiased=False)  # [C]
    return ((flat - mean[:, None]) / std.clamp_min(eps)[:, None]).reshape(m, -1)


def sliced_wasserstein_1(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor, chunk: int = 128) -> float:
    """Mean over unit ``directions`` [D, K] of the exact 1-D Wasserstein-1 distance between the
    projections of the rows of a [M, D] and b [M', D] (ProGAN's ``sliced_wasserstein`` per repeat:
    mean |sort(a theta) - sort(b theta)| when M = M'; `_wasserstein_1d` when the sizes differ)."""
    total = 0.0
    for j in range(0, directions.shape[1], chunk):
        d = directions[:, j:j + chunk].to(a).T.contiguous()  # [k, D]
        pa, pb = _sorted_rows(d @ a.T), _sorted_rows(d @ b.to(a).T)  # [k, M], [k, M']
        total += float(_wasserstein_1d(pa, pb, 1.0).sum())
    return total / directions.shape[1]


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of a fresh [k, M] tensor sorted ascending, in place. On the CPU with numpy's sort
    (vectorised; ~10x faster than torch.sort on large rows here); the values are the same either way."""
    if x.device.type != "cpu":
        return x.sort(dim=1).values
    x = x.contiguous()
    x.numpy().sort(axis=1)
    return x


def swd_multiscale(
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
    patches_per_image: int = 128,
    patch_size: int = 7,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    min_resolution: int | None = None,
) -> dict:
    """ProGAN's SWD between two image sets, x 1e3 as ProGAN reports it (lower is better).

    real [N, C, R, R], fake [M, C, R, R]: uint8 [0, 255] or float (e.g. [-1, 1]; the per-set
    standardisation makes the value independent of an affine pixel scale, so both give the same
    number). For each Laplacian-pyramid level (``swd_resolutions``: e.g. 16 and 8 px at R = 16, 32
    and 16 at R = 32): ``patches_per_image`` random ``patch_size``^2 neighbourhoods per image,
    standardised per channel over each set (``normalize_descriptors``), then the sliced Wasserstein-1
    distance along ``dir_repeats`` x ``dirs_per_repeat`` random unit directions (ProGAN: 4 x 128),
    averaged. Computed in float32 (float64 if an input is float64), on the inputs' device.

    Randomness, all from ``generator`` (CPU), in this order for each level, finest first: the patch
    corners (int64 [max(N, M), P, 2], uniform in [0, res - patch_size]), then ``dir_repeats`` Gaussian
    [D, dirs_per_repeat] matrices normalised to unit columns. Image i of either set takes its patches at
    the same corners (ProGAN draws them independently per set): each set's patches are still uniformly
    placed, and SWD(x, x) = 0 exactly, with less sampling noise between the sets.

    Returns {"levels": {res: SWD x 1e3}, "mean": their mean}.
    """
    if real.ndim != 4 or fake.ndim != 4 or real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"need two image sets [N, C, R, R] of the same image shape, got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    if real.shape[-1] != real.shape[-2]:
        raise ValueError(f"SWD needs square images, got {tuple(real.shape[-2:])}")
    if min(real.shape[0], fake.shape[0]) < 1 or patches_per_image < 1 or dir_repeats < 1 or dirs_per_repeat < 1:
        raise ValueError("need non-empty image sets and positive patch and direction counts")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    dtype = torch.float64 if torch.float64 in (real.dtype, fake.dtype) else torch.float32
    res = swd_resolutions(real.shape[-1], min_resolution)
    pyramids = [laplacian_pyramid(x.to(dtype), len(res)) for x in (real, fake)]
    levels = {}
    for lvl, r in enumerate(res):
        corners = torch.randint(0, r - patch_size + 1, (max(real.shape[0], fake.shape[0]), patches_per_image, 2),
                                generator=g)
        descs = [normalize_descriptors(patch_descriptors(pyr[lvl], corners[:pyr[lvl].shape[0]], patch_size))
                 for pyr in pyramids]
        dists = []
        for _ in range(dir_repeats):
            dirs = torch.randn(descs[0].shape[1], dirs_per_repeat, generator=g, dtype=torch.float64)
            dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(dtype)
            dists.append(sliced_wasserstein_1(descs[0], descs[1], dirs))
        levels[r] = 1e3 * sum(dists) / len(dists)
    return {"levels": levels, "mean": sum(levels.values()) / len(levels)}


# ----------------------------------------------------------------------------------------------
# Distance to the shapes manifold.


def _free_variables(raw: torch.Tensor, col: dict[str, int]) -> list[torch.Tensor]:
    """Predicted parameters [n, P] -> free variables (centre [n,2], size [n,1], angle of k*theta
    [n,1], fg [n,3], bg [n,3]) from which `_assemble` builds a valid parameter vector."""
    return [
        raw[:, [col["cx"], col["cy"]]],
        raw[:, [col["size"]]],
        torch.atan2(raw[:, [col["sin_ktheta"]]], raw[:, [col["cos_ktheta"]]]),
        raw[:, [col["fg_r"], col["fg_g"], col["fg_b"]]],
        raw[:, [col["bg_r"], col["bg_g"], col["bg_b"]]],
    ]


def _assemble(kind: int, free: list[torch.Tensor], col: dict[str, int], orders: tuple[int, ...]) -> torch.Tensor:
    """Valid shape parameters [n, P] of one kind: one-hot kind, size > 0, unit orientation vector
    (zero for the rotation-invariant disk), colours clipped to [0, 1]."""
    centre, size, angle, fg, bg = free
    n = centre.shape[0]
    values = {
        "cx": centre[:, 0], "cy": centre[:, 1], "size": size[:, 0].clamp_min(1e-3),
        "cos_ktheta": angle[:, 0].cos() * float(orders[kind] > 0),
        "sin_ktheta": angle[:, 0].sin() * float(orders[kind] > 0),
    }
    for j, c in enumerate("rgb"):
        values[f"fg_{c}"], values[f"bg_{c}"] = fg[:, j].clamp(0, 1), bg[:, j].clamp(0, 1)
    onehot = F.one_hot(torch.full((n,), kind, device=centre.device), len(orders)).to(centre.dtype)
    for j, name in enumerate(k for k in col if k.startswith("kind_")):
        values[name] = onehot[:, j]
    return torch.stack([values[name] for name in col], 1)  # columns in SHAPE_PARAM_NAMES order


def shapes_manifold_error(
    images: torch.Tensor,
    evaluator: nn.Module,
    refine_steps: int = 0,
    lr: float = 0.01,
    reduction: str = "mean",
) -> float | torch.Tensor:
    """Per-pixel RMSE between each image and its best-fitting rendering on the shapes manifold.

    The shapes manifold is {`ayt.data.render_shapes(params, R)`} over valid parameters. For each
    image [3, R, R] in [-1, 1]:
      1. `evaluator(images)` predicts the parameters (columns `ayt.data.SHAPE_PARAM_NAMES`);
      2. for each of the three kinds, the prediction is projected to a valid parameter vector
         (one-hot kind, unit orientation vector, colours clipped to [0, 1], size > 0) and, if
         `refine_steps` > 0, refined by Adam (learning rate `lr`) on the rendering's squared
         error (render_shapes is differentiable);
      3. the error is the smallest RMSE over kinds (and over before/after refinement):
         sqrt(mean_{c,h,w} (image - render)^2).
    It is an upper bound on the distance to the manifold (0 for data images whose parameters are
    recovered exactly); units are [-1, 1] pixel values. Returns the mean (reduction="mean") or
    the per-image errors [N] (reduction="none").
    """
    from .data import SHAPE_PARAM_NAMES, SHAPE_SYMMETRY_ORDERS, render_shapes

    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square RGB images [N, 3, R, R], got {tuple(images.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    x = _as_float_images(images)
    res = x.shape[-1]
    col = {name: i for i, name in enumerate(SHAPE_PARAM_NAMES)}
    orders = tuple(SHAPE_SYMMETRY_ORDERS)

    def rmse(kind: int, free: list[torch.Tensor]) -> torch.Tensor:  # [N]
        with torch.no_grad():
            render = render_shapes(_assemble(kind, [t.detach() for t in free], col, orders), res)
            return (render - x).square().mean((1, 2, 3)).sqrt()

    with torch.no_grad():
        raw = evaluator(x).to(torch.float32)
    best = torch.full((x.shape[0],), float("inf"), device=x.device)
    for kind in range(len(orders)):
        free = [t.detach().clone() for t in _free_variables(raw, col)]
        best = torch.minimum(best, rmse(kind, free))
        if refine_steps > 0:
            with torch.enable_grad():
                for t in free:
                    t.requires_grad_(True)
                opt = torch.optim.Adam(free, lr=lr)
                for _ in range(refine_steps):
                    render = render_shapes(_assemble(kind, free, col, orders), res)
                    # summed over images, so each image's variables get their own gradient
                    loss = (render - x).square().mean((1, 2, 3)).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            best = torch.minimum(best, rmse(kind, free))
    return float(best.mean()) if reduction == "mean" else best
