"""Frechet Inception Distance (FID), docs/method.md section 5.2.

The FID of the paper is pytorch-fid's (mseitzer/pytorch-fid): Inception-v3 pool3 features
(2048-d) of the TensorFlow "inception-2015-12-05" graph ported to PyTorch
(`pt_inception-2015-12-05-6726825d.pth`), computed on images quantised exactly as EDM/AYT
write their PNGs, `(x * 127.5 + 128).clip(0, 255)` to uint8, against CIFAR-10 train statistics.

This module keeps the quantised images in memory (no PNG round trip; PNG is lossless, so the
features are the same bit for bit, see tests/test_fid.py) and accumulates the feature mean and
covariance in float64 as EDM's `fid.py` does (sums and sums of outer products, all-reduced
across ranks).

Pieces (metrics are pure math on features, separate from feature extraction):
  InceptionV3FID     the network, state dict identical to pytorch-fid's weights file
  load_inception     find (or download once) the weights and load them strictly
  quantize           [-1, 1] float -> uint8, EDM's PNG quantisation
  FeatureStats       streaming float64 mean / covariance, mergeable across processes
  frechet_distance   ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
  save_stats / load_stats / compute_stats / reference_stats / fid_from_generator
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Optional

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv_inception

from .progress import Progress

__all__ = [
    "FID_WEIGHTS_URL",
    "FID_WEIGHTS_FILENAME",
    "WEIGHTS_ENV_VAR",
    "FEATURE_DIM",
    "WeightsNotFoundError",
    "InceptionV3FID",
    "default_weights_path",
    "load_inception",
    "quantize",
    "FeatureStats",
    "frechet_distance",
    "save_stats",
    "load_stats",
    "compute_stats",
    "reference_stats",
    "fid_from_generator",
]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
WEIGHTS_ENV_VAR = "AYT_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048  # pool3
INPUT_SIZE = 299  # pytorch-fid resizes every input to 299 x 299


# ----------------------------------------------------------------------------------------------
# Network.


class _FIDInceptionA(tv_inception.InceptionA):
    """Mixed_5b/5c/5d. TF's 3x3 average pool ignores the zero padding (count_include_pad=False)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], dim=1)


class _FIDInceptionC(tv_inception.InceptionC):
    """Mixed_6b..6e. Same average-pool patch as A."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class _FIDInceptionE(tv_inception.InceptionE):
    """Mixed_7b (pool="avg", padding excluded) and Mixed_7c (pool="max").

    The TF FID graph uses a 3x3 *max* pool in the pool branch of its last block (Mixed_7c),
    unlike the Inception-v3 paper; pytorch-fid reproduces this and so do we.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        if self.pool == "avg":
            p = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        else:
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([b1, b3, b3d, self.branch_pool(p)], dim=1)


class InceptionV3FID(nn.Module):
    """The FID variant of Inception-v3 (pytorch-fid's `fid_inception_v3`), pool3 output.

    Submodule names equal torchvision's `Inception3(num_classes=1008, aux_logits=False)`, the
    model into which pytorch-fid loads `pt_inception-2015-12-05-6726825d.pth`, so that file
    loads with `strict=True`. The 1008-way `fc` layer is kept only for that reason; `forward`
    stops at the global average pool.

    Input  (pytorch-fid's preprocessing, reproduced exactly; 1-channel images are replicated to RGB):
      * uint8 [N, 3, H, W] in [0, 255] (e.g. from `quantize`): converted as torchvision's
        `ToTensor` does (`u.float() / 255`), bilinearly resized to 299 x 299
        (align_corners=False), then mapped to [-1, 1] by `2 x - 1`. This is the path that
        matches pytorch-fid on PNG files bit for bit (up to kernel nondeterminism).
      * float [N, 3, H, W] in [-1, 1]: used as is (not quantised), resized to 299 x 299. Since
        bilinear resizing is affine-invariant this equals the uint8 path on `(x + 1) / 2`
        up to float rounding. Use `quantize` first for numbers comparable with the paper.
    Output: [N, 2048] float32 pool3 features.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = tv_inception.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv_inception.InceptionB(288)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv_inception.InceptionD(768)
        self.Mixed_7b = _FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = _FIDInceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1008)  # unused by forward; present for strict loading

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1], [N, 3, H, W] -> float32 [-1, 1], [N, 3, 299, 299]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [N, 3, H, W] or [N, 1, H, W], got {tuple(images.shape)}")
        if images.shape[1] == 1:  # greyscale: replicate, as PIL's convert("RGB") / EDM's fid.py do
            images = images.expand(-1, 3, -1, -1)
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div(255)  # torchvision ToTensor, as pytorch-fid reads PNGs
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
            return 2 * x - 1
        if not images.is_floating_point():
            raise ValueError(f"expected uint8 or floating-point images, got {images.dtype}")
        x = images.to(torch.float32)
        return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 [N, 3, H, W] or float [-1, 1] [N, 3, H, W] -> pool3 features [N, 2048]."""
        x = self.preprocess(images)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))  # 64x73x73
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # 192x35x35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # 288x35x35
        x = self.Mixed_6a(x)  # 768x17x17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # 768x17x17
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # 2048x8x8
        return self.avgpool(x).flatten(1)  # [N, 2048]


# ----------------------------------------------------------------------------------------------
# Weights.


class WeightsNotFoundError(FileNotFoundError):
    """The pytorch-fid Inception weights are not on disk and could not be downloaded."""


def default_weights_path() -> str:
    """torch hub cache location used by pytorch-fid: `<torch.hub.get_dir()>/checkpoints/<file>`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILENAME)


def _not_found(reason: str, dest: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"Inception-v3 FID weights not found ({reason}). Download {FID_WEIGHTS_URL} and either "
        f"place it at {dest} , or set the environment variable {WEIGHTS_ENV_VAR} to its path, or "
        f"pass weights=<path> to ayt.fid.load_inception."
    )


def _resolve_weights(weights: str | os.PathLike | None, download: bool) -> str:
    """Weights lookup order: argument, $AYT_INCEPTION_WEIGHTS, hub cache, one download attempt."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise _not_found(f"no file at weights={path!r}", path)
        return path
    env = os.environ.get(WEIGHTS_ENV_VAR)
    if env:
        if not os.path.isfile(env):
            raise _not_found(f"{WEIGHTS_ENV_VAR}={env!r} is not a file", env)
        return env
    path = default_weights_path()
    if os.path.isfile(path):
        return path
    if not download:
        raise _not_found("download disabled", path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        # Writes to a temporary file and moves it into place, so a failure leaves no partial file.
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, path, progress=False)
    except Exception as err:  # no network, proxy, HTTP error, ...
        raise _not_found(f"download failed: {type(err).__name__}: {err}", path) from err
    return path


def load_inception(
    weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    download: bool = True,
) -> InceptionV3FID:
    """The pytorch-fid Inception-v3 with its weights, in eval mode, without gradients.

    Weights are looked up in this order: the `weights` argument; the environment variable
    `AYT_INCEPTION_WEIGHTS`; `torch.hub.get_dir()/checkpoints/pt_inception-2015-12-05-6726825d.pth`
    (where pytorch-fid caches it); finally one download of `FID_WEIGHTS_URL` into that cache
    (if `download`). Raises `WeightsNotFoundError` naming the expected path and the URL.
    """
    path = _resolve_weights(weights, download)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = InceptionV3FID()
    # The 2015 TF port predates BatchNorm's `num_batches_tracked` buffer; it has no effect in eval.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net


# ----------------------------------------------------------------------------------------------
# Quantisation.


def quantize(x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """[-1, 1] float images -> uint8, exactly as EDM/AYT write PNGs: `(x*127.5+128).clip(0,255)`.

    The cast truncates toward zero, i.e. rounds to nearest for in-range values. Same shape and
    device as `x`. Raises ValueError on NaN/inf (a diverged sampler must not get a finite FID);
    check=False leaves that check to the caller (it costs a host sync: `fid_from_generator` counts
    non-finite images on the device and checks once at the end).
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize expects floating-point images in [-1, 1], got {x.dtype}")
    if check and not bool(torch.isfinite(x).all()):
        raise ValueError("quantize: images contain NaN or inf")
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Statistics.


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective_device(device: torch.device | str | None) -> torch.device:
    """Where a rank without data keeps its (zero) statistics so the all-reduce backend accepts them."""
    if device is not None:
        return torch.device(device)
    if _dist_ready() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Keeps n, sum_i f_i [D] and sum_i f_i f_i^T [D, D] (as EDM's fid.py), so that statistics from
    several batches, objects (`merge`) or processes (`all_reduce`) combine by addition.
    `mean()` and `cov()` equal `np.mean(F, 0)` and `np.cov(F, rowvar=False)` (unbiased).
    """

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # deferred check (update(check=False))

    def update(self, feats: torch.Tensor, check: bool = True) -> None:
        """Add a batch of features [N, D]. check=False counts non-finite values on the device instead
        of asking the host (no sync per batch); `mean`/`cov` then raise if there were any."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {tuple(feats.shape)}")
        f = feats.detach().to(device=self.sum.device, dtype=torch.float64)
        if check and not bool(torch.isfinite(f).all()):
            raise ValueError("FeatureStats.update: features contain NaN or inf")
        if not check:
            self.nonfinite += (~torch.isfinite(f)).sum()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's sums into this one (in place); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        self.nonfinite += other.nonfinite.to(self.sum.device)
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum n and the sums over all processes if torch.distributed is initialised; returns self.

        Every rank must call it (a collective). Without torch.distributed it is a no-op.
        """
        if _dist_ready():
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.sum_outer, self.nonfinite):
                torch.distributed.all_reduce(t)
            self.n = int(round(n.item()))
        return self

    def _check_finite(self) -> None:
        if float(self.nonfinite) > 0:
            raise ValueError(f"FeatureStats: {int(self.nonfinite)} non-finite feature values were added")

    def mean(self) -> np.ndarray:
        """Feature mean [D], float64."""
        if self.n < 1:
            raise ValueError("FeatureStats.mean: no samples")
        self._check_finite()
        return (self.sum / self.n).cpu().numpy()

    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D], float64 (np.cov(F, rowvar=False))."""
        if self.n < 2:
            raise ValueError(f"FeatureStats.cov needs at least 2 samples, got {self.n}")
        self._check_finite()
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry
        return sigma.cpu().numpy()


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    scale = max(np.abs(sigma).max(), np.finfo(np.float64).tiny)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"{name}: covariance is not symmetric")
    return mu, 0.5 * (sigma + sigma.T)


def _check_psd(w: np.ndarray, name: str, rtol: float = 1e-5) -> None:
    """Eigenvalues w of a covariance: only rounding-sized negative values are tolerated."""
    if w.min() < -rtol * max(abs(w).max(), np.finfo(np.float64).tiny):
        raise ValueError(f"{name}: covariance is not positive semi-definite (min eigenvalue {w.min():.3g})")


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    """Symmetric PSD square root by eigendecomposition; null-space eigenvalues set to 0."""
    w, v = np.linalg.eigh(sigma)
    _check_psd(w, name)
    return (v * np.sqrt(_clip_null(w))) @ v.T


def _clip_null(w: np.ndarray) -> np.ndarray:
    """Eigenvalues below the numerical rank threshold D * eps * max|w| set to 0.

    Exact zeros of a rank-deficient covariance come out of eigh as +-1e-16-sized noise whose
    square roots (~1e-8 each) would otherwise add up to a visible bias in tr sqrt(.)."""
    tol = w.shape[0] * np.finfo(np.float64).eps * max(abs(w).max(), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    method: str = "eigh",
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2): ||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    mu: [D], sigma: [D, D] (numpy or anything np.asarray takes), computed in float64.

    method="eigh" (default): tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2) = sum_i sqrt(l_i) over
      the eigenvalues l_i >= 0 of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (similar to S1 S2).
      Exact for singular (rank-deficient) covariances, needs no offset, cannot go complex.
    method="sqrtm": pytorch-fid's `calculate_frechet_distance`: scipy.linalg.sqrtm(S1 S2); if that
      is not finite, retried with eps * I added to both covariances; an imaginary part is dropped
      only if the diagonal's is below 1e-3, else ValueError.
    The two agree to ~1e-8 relative or better on well-conditioned statistics (tests/test_fid.py;
    and on random 2048-d ones). Raises ValueError
    on non-finite, mismatched, asymmetric or indefinite input, and on a non-finite result.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "stats 1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "stats 2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    if method == "eigh":
        s1_half = _psd_sqrt(sigma1, "stats 1")
        _check_psd(np.linalg.eigvalsh(sigma2), "stats 2")
        m = s1_half @ sigma2 @ s1_half
        lam = np.linalg.eigvalsh(0.5 * (m + m.T))
        tr_covmean = np.sqrt(_clip_null(lam)).sum()
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm has imaginary component {np.abs(covmean.imag).max():.3g}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not math.isfinite(fd):
        raise ValueError(f"Frechet distance is not finite ({fd})")
    return fd


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write pytorch-fid/EDM-style reference statistics: an .npz with keys `mu` [D], `sigma` [D, D].

    Written to a temporary file and renamed, so concurrent readers never see a partial file.
    """
    path = os.fspath(path)
    mu, sigma = _check_stats(mu, sigma, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike, dim: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Read (mu [D], sigma [D, D]) float64 from an .npz with keys `mu`, `sigma` (pytorch-fid, EDM).
    A missing or unreadable file, missing keys, shapes other than [D] / [D, D] (D = `dim` when given)
    and non-finite values raise ValueError naming the file, so a bad reference fails before sampling."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path}: no such file")
    try:
        data = np.load(path)
        files = list(data.files)
    except Exception as e:
        raise ValueError(f"reference statistics {path} cannot be read as an .npz file ({e})") from e
    with data:
        missing = {"mu", "sigma"} - set(files)
        if missing:
            raise ValueError(f"reference statistics {path} lack the key(s) {sorted(missing)} (it has {files}); "
                             "expected an .npz with mu [D] and sigma [D, D], as pytorch-fid and EDM write")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d) or (dim is not None and d != dim):
        want = f"{dim}" if dim is not None else "D"
        raise ValueError(f"reference statistics {path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not "
                         f"match features of width {want} (expected mu [{want}], sigma [{want}, {want}]; Inception "
                         "pool3 features are 2048 wide)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"reference statistics {path} contain NaN or infinite values "
                         f"({int((~np.isfinite(mu)).sum())} in mu, {int((~np.isfinite(sigma)).sum())} in sigma)")
    return mu, sigma


# ----------------------------------------------------------------------------------------------
# Feature extraction drivers.

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def _as_images(item: Any) -> torch.Tensor:
    """A batch from a loader/dataset: a tensor, or a (tensor, label, ...) tuple/list."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"expected an image tensor (or a tuple starting with one), got {type(item)}")
    return item


def _extract(images: torch.Tensor, feature_fn: FeatureFn, device, do_quantize: bool, check: bool = True) -> torch.Tensor:
    if device is not None:
        images = images.to(device)
    if do_quantize and images.is_floating_point():
        images = quantize(images, check=check)
    with torch.no_grad():
        feats = feature_fn(images)
    if feats.ndim != 2:
        raise ValueError(f"feature_fn must return [N, D], got {tuple(feats.shape)}")
    return feats


def compute_stats(
    images: torch.Tensor | torch.utils.data.Dataset | Iterable,
    feature_fn: FeatureFn,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    quantize_input: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean [D] and covariance [D, D] (float64 numpy) of a set of images.

    images: one of
      * a tensor [N, C, H, W] (float in [-1, 1] or uint8),
      * a map-style Dataset whose items are an image [C, H, W] or (image, label, ...),
      * any other iterable of batches [B, C, H, W] (or (batch, labels, ...)), e.g. a DataLoader.
    Tensors and Datasets are split across ranks when torch.distributed is initialised (each rank
    takes every world_size-th batch, as EDM) and the statistics are all-reduced; a plain iterable
    is consumed entirely by this process and not reduced.
    feature_fn: [B, C, H, W] -> [B, D], e.g. `load_inception()`.
    quantize_input: float images are quantised with `quantize` (EDM's PNG quantisation) first.
    Progress (images whose features are extracted, rank 0's share times the world size) goes to stderr.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    stats: FeatureStats | None = None
    indexable = isinstance(images, torch.Tensor) or (
        isinstance(images, torch.utils.data.Dataset) and hasattr(images, "__len__")
    )
    rank, world = _rank_world() if indexable else (0, 1)
    bar = Progress(len(images) if indexable else None, "[fid] feature statistics", "img")

    def add(batch: torch.Tensor) -> None:
        nonlocal stats
        feats = _extract(batch, feature_fn, device, quantize_input)
        if stats is None:
            stats = FeatureStats(feats.shape[1], device=feats.device)
        stats.update(feats)
        bar.update(world * feats.shape[0])

    if indexable:
        n = len(images)
        for start in range(rank * batch_size, n, world * batch_size):
            idx = range(start, min(start + batch_size, n))
            if isinstance(images, torch.Tensor):
                add(images[idx.start:idx.stop])
            else:
                add(torch.stack([_as_images(images[i]) for i in idx]))
        if stats is None:  # this rank got no batch: it must still join the all-reduce
            probe = images[:1] if isinstance(images, torch.Tensor) else _as_images(images[0])[None]
            feats = _extract(probe, feature_fn, device, quantize_input)
            stats = FeatureStats(feats.shape[1], device=feats.device)
        stats.all_reduce()
    else:
        for item in images:
            add(_as_images(item))
        if stats is None:
            raise ValueError("compute_stats: the image iterable was empty")
    bar.close()
    return stats.mean(), stats.cov()


def reference_stats(
    dataset: torch.Tensor | torch.utils.data.Dataset | Iterable,
    cache_path: str | os.PathLike,
    feature_fn: FeatureFn | None = None,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    quantize_input: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset statistics (mu, sigma), computed once and cached at `cache_path` (.npz).

    If the cache exists it is loaded (and `feature_fn` is not needed). Otherwise they are
    computed with `compute_stats` (default feature_fn: `load_inception(device=device)`), written
    by rank 0, and all ranks wait for the file.
    """
    if os.path.isfile(cache_path):
        return load_stats(cache_path)
    if feature_fn is None:
        feature_fn = load_inception(device=device)
    mu, sigma = compute_stats(dataset, feature_fn, batch_size=batch_size, device=device,
                              quantize_input=quantize_input)
    rank, _ = _rank_world()
    if rank == 0:
        save_stats(cache_path, mu, sigma)
    if _dist_ready():
        torch.distributed.barrier()
    return mu, sigma


def fid_from_generator(
    sample_fn: Callable[[int, int], torch.Tensor],
    n: int,
    batch_size: int,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    extractor: FeatureFn | None = None,
    device: torch.device | str | None = None,
) -> float:
    """FID of `n` generated images against reference statistics, without writing images.

    sample_fn(batch_index, batch_size) -> images [batch_size, 3, H, W] in [-1, 1]; batch i holds
    samples i*batch_size ... (the last batch is shorter), so a sampler seeded by batch index gives
    the same sample set for any number of processes. Under torch.distributed rank r generates
    batches r, r + world, ... and the feature statistics are all-reduced; every rank returns the
    same FID. Images are quantised (`quantize`) before `extractor` (default: `load_inception`
    on `device`).
    """
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got n={n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if extractor is None:
        extractor = load_inception(device=device)
    rank, world = _rank_world()
    stats: FeatureStats | None = None
    bad_images = None  # non-finite image values, counted on the device: no host sync per batch
    for b in range(rank, math.ceil(n / batch_size), world):
        size = min(batch_size, n - b * batch_size)
        images = sample_fn(b, size)
        if images.shape[0] != size:
            raise ValueError(f"sample_fn({b}, {size}) returned {images.shape[0]} images")
        if device is not None:
            images = images.to(device)
        if images.is_floating_point():
            bad = (~torch.isfinite(images)).sum(dtype=torch.float64)
            bad_images = bad if bad_images is None else bad_images + bad
        feats = _extract(images, extractor, device, do_quantize=True, check=False)
        if stats is None:
            stats = FeatureStats(feats.shape[1], device=feats.device)
        stats.update(feats, check=False)
    if stats is None:  # more ranks than batches: join the all-reduce with zeros
        stats = FeatureStats(len(ref_mu), device=_collective_device(device))
    # a diverged sampler must not get a finite FID: one check (one sync) for all batches and ranks
    bad = torch.zeros((), dtype=torch.float64, device=stats.sum.device) if bad_images is None else bad_images.to(stats.sum.device)
    if _dist_ready():
        torch.distributed.all_reduce(bad)
    if float(bad) > 0:
        raise ValueError(f"fid_from_generator: the samples contain {int(bad)} NaN or inf values (a diverged sampler?)")
    stats.all_reduce()
    if stats.n != n:
        raise RuntimeError(f"expected {n} samples in total, accumulated {stats.n}")
    return frechet_distance(stats.mean(), stats.cov(), ref_mu, ref_sigma)
