"""Small-scale sample-quality metrics for runs where Inception weights are unavailable.

These are measurement instruments for the built-in shapes data (`ayt.data.make_shapes`) and other
small experiments, not quantities from the paper; FID (docs/method.md section 5.2) lives in `ayt.fid`.

  ShapesEvaluator / train_evaluator   a small CNN regressing the shapes' generating parameters;
                                      its penultimate layer is the feature space of FD_eval
  frechet_feature_distance            "FD_eval": the Frechet distance on evaluator features
  precision_recall                    improved precision/recall (Kynkaanniemi et al. 2019)
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
    "train_evaluator",
    "evaluator_loss",
    "frechet_feature_distance",
    "precision_recall",
    "sliced_wasserstein",
    "shapes_manifold_error",
]


# ----------------------------------------------------------------------------------------------
# Evaluator network.


def _as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (e.g. `fid.quantize` output) or float [-1, 1] -> float32 [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32) / 127.5 - 1
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating-point images, got {x.dtype}")
    return x.to(torch.float32)


class ShapesEvaluator(nn.Module):
    """A small CNN that regresses generating parameters; `features` is its penultimate layer.

    Architecture: len(channels) stages of [conv3x3 -> GroupNorm(8) -> SiLU -> 2x2 avg-pool (while
    the map is at least 2x2)], global average pool, Linear(C, feature_dim) -> SiLU (= features),
    Linear(feature_dim, n_params). Defaults: ~260k parameters, 128-d features, any resolution.

    Predictions are in the original parameter units: the head predicts standardised parameters
    and `forward` undoes the standardisation with the buffers `param_mean`, `param_std`
    (set by `train_evaluator`).
    Input: images [N, C, H, W], uint8 or float in [-1, 1].
    """

    def __init__(
        self,
        n_params: int,
        in_channels: int = 3,
        channels: tuple[int, ...] = (32, 64, 128, 128),
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        if n_params < 1 or feature_dim < 1 or not channels:
            raise ValueError("n_params, feature_dim and channels must be positive/non-empty")
        self.kwargs = dict(n_params=n_params, in_channels=in_channels, channels=tuple(channels),
                           feature_dim=feature_dim)
        self.stages = nn.ModuleList()
        c_prev = in_channels
        for c in channels:
            self.stages.append(nn.Sequential(
                nn.Conv2d(c_prev, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()))
            c_prev = c
        self.fc = nn.Linear(c_prev, feature_dim)
        self.head = nn.Linear(feature_dim, n_params)
        self.register_buffer("param_mean", torch.zeros(n_params))
        self.register_buffer("param_std", torch.ones(n_params))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> penultimate features [N, feature_dim]."""
        x = _as_float_images(images)
        for stage in self.stages:
            x = stage(x)
            if min(x.shape[-2:]) >= 2:
                x = F.avg_pool2d(x, 2)
        return F.silu(self.fc(x.mean((-2, -1))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> predicted parameters [N, n_params] (original units)."""
        return self.head(self.features(images)) * self.param_std + self.param_mean

    def save(self, path: str | os.PathLike) -> None:
        """torch.save({'kwargs', 'state_dict'}); reload with `ShapesEvaluator.load`."""
        torch.save({"kwargs": self.kwargs, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> ShapesEvaluator:
        """Rebuild from `save` output (strict), in eval mode without gradients."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        net = cls(**blob["kwargs"])
        net.load_state_dict(blob["state_dict"], strict=True)
        return net.eval().requires_grad_(False)


def _reset_parameters(net: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Conv/Linear init (kaiming-uniform a=sqrt 5, uniform bias), drawn from `generator`."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(m.weight[0].numel())
            nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def evaluator_loss(evaluator: ShapesEvaluator, images: torch.Tensor, params: torch.Tensor,
                   batch_size: int = 512) -> float:
    """Mean squared error of the standardised parameter predictions (the training loss), no grad."""
    dev = evaluator.param_mean.device
    total, n = 0.0, images.shape[0]
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x, y = images[i:i + batch_size].to(dev), params[i:i + batch_size].to(dev, torch.float32)
            err = (evaluator(x) - y) / evaluator.param_std
            total += float(err.square().mean(1).sum())
    return total / n


def train_evaluator(
    images: torch.Tensor,
    params: torch.Tensor,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> ShapesEvaluator:
    """Train a `ShapesEvaluator` to regress `params` [N, P] from `images` [N, C, H, W].

    Adam on the MSE of standardised parameters (per-column mean/std of `params`; constant columns
    get std 1). `seed` fixes the initialisation and the minibatch order. `kwargs` go to the
    constructor. Returns the network in eval mode with gradients disabled.
    """
    if images.shape[0] != params.shape[0] or params.ndim != 2:
        raise ValueError(f"need images [N, ...] and params [N, P], got {tuple(images.shape)}, {tuple(params.shape)}")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    net = ShapesEvaluator(n_params=params.shape[1], in_channels=images.shape[1], **kwargs)
    _reset_parameters(net, g)
    p = params.to(torch.float32)
    std = p.std(0) if p.shape[0] > 1 else torch.ones(p.shape[1])
    net.param_mean.copy_(p.mean(0))
    net.param_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    net.to(device)
    dev = net.param_mean.device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    n = images.shape[0]
    for _ in progress(range(steps), desc="[shapes evaluator] training", unit="step"):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        x, y = images[idx].to(dev), p[idx].to(dev)
        target = (y - net.param_mean) / net.param_std
        loss = (net.head(net.features(x)) - target).square().mean()
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
        return (a - b).abs().pow(p).mean(1)
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
