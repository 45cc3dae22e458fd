"""Augmentation pipe whose random parameters are the regression labels of the feature net.

docs/method.md section 3.3. The manifold feature network phi is trained to regress the parameters of
random augmentations. This module draws those parameters, applies them, and returns the labels:

    pipe = AugmentPipe('geo_clr_deg', p=0.15)
    x_aug, labels = pipe(x, generator=g)          # x: [N, C, H, W] in [-1, 1], labels: [N, 15]

Parameter sampling and application are separate, so that a transform can be applied with given
parameters (tests, tangent analysis):

    params = pipe.sample_params(N, generator=g, device=x.device, shape=x.shape[1:])
    x_aug, labels = pipe.apply(x, params)                     # deterministic
    x_b, labels_b = pipe.apply(x, pipe.make_params(N, brightness=0.5))   # brightness only

The math, the label definitions and their order follow the authors' augmentation pipe
(1202kbs/AYT `src/ayt/augmentations.py` with `configs/aug/*.yaml`), which extends the pipe of
EDM / StyleGAN2-ADA (NVlabs/edm `training/augment.py`). Groups are applied in this order:

1. geometric (scale, rotate, aniso, translate): one affine warp, executed with reflect padding,
   2x upsampling with the sym6 wavelet filter, bilinear `grid_sample`, 2x downsampling;
2. colour (brightness, contrast, hue, saturation): one 4x4 colour matrix;
3. blur: Gaussian blur with per-sample sigma;
4. additive (mixup with the reversed batch of the images after steps 1-3, then noise):
   `x + w_mix * (x.flip(0) - x) + w_noise * sqrt(CHW) * n / ||n||`.

Labels (LABEL_NAMES order; a label is 0 when its transform is off for that sample):

=============  ===================  =====================================================
transform      labels               image change (per sample, when on)
=============  ===================  =====================================================
scale          w                    isotropic scale 2^(scale_std w), w ~ N(0, 1)
rotate         cos(th)-1, sin(th)   rotation by th ~ U(-pi, pi) * rotate_max
aniso          w cos(rho), w sin(rho)  scale 2^(aniso_std w) along an axis at angle rho and
                                    2^(-aniso_std w) across it; rho ~ U(-pi, pi) with
                                    probability aniso_rotate_prob, else 0
translate      w0, w1               shift by translate_std * (W w0, H w1) pixels, w ~ N(0, 1)
brightness     w                    x + brightness_std * w, w ~ N(0, 1)
contrast       w                    x * 2^(contrast_std w), w ~ N(0, 1)
hue            cos(th)-1, sin(th)   rotation about the luma axis (1,1,1)/sqrt(3),
                                    th ~ U(-pi, pi) * hue_max
saturation     w                    chroma (component orthogonal to the luma axis) times
                                    2^(saturation_std w), w ~ N(0, 1)
blur           sigma                Gaussian blur, sigma ~ U(0, blur_sigma_max),
                                    blur_kernel_size^2 kernel, reflect padding
mixup          w                    x + w (x_rev - x), w ~ 0.5 Beta(1, mixup_beta)
noise          w                    x + w sqrt(CHW) n / ||n||, n ~ N(0, I), w ~ U(0, noise_std)
=============  ===================  =====================================================

Note (a property of the reference labels, kept as is): the aniso labels (w cos rho, w sin rho)
do not identify the transform uniquely, since (w, rho) and (-w, rho + pi) give the same labels
but reciprocal stretches.

Parameter dictionaries hold, for every transform t of the pipe, a bool mask `params[t + '_on']`
of shape [N] and the raw value `params[t]` ([N]; [N, 2] for translate), plus
`params['aniso_angle']` [N] (rho) and `params['noise_dir']` [N, C, H, W] (the Gaussian draw n;
`make_params` leaves it out when noise is off and no shape is given). Values are stored unmasked;
`apply` zeroes them where the mask is off.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------
# Label layout.

TRANSFORM_LABELS: dict[str, tuple[str, ...]] = {
    # geometric (7 labels)
    "scale": ("scale",),
    "rotate": ("rotate_cos", "rotate_sin"),
    "aniso": ("aniso_cos", "aniso_sin"),
    "translate": ("translate_x", "translate_y"),
    # colour (5 labels)
    "brightness": ("brightness",),
    "contrast": ("contrast",),
    "hue": ("hue_cos", "hue_sin"),
    "saturation": ("saturation",),
    # degradation (3 labels)
    "blur": ("blur",),
    "mixup": ("mixup",),
    "noise": ("noise",),
}
TRANSFORMS: tuple[str, ...] = tuple(TRANSFORM_LABELS)
GROUPS: dict[str, tuple[str, ...]] = {
    "geo": ("scale", "rotate", "aniso", "translate"),
    "clr": ("brightness", "contrast", "hue", "saturation"),
    "deg": ("blur", "mixup", "noise"),
}
# Every label of every transform, in the order the labels are concatenated (15 names).
LABEL_NAMES: tuple[str, ...] = tuple(name for t in TRANSFORMS for name in TRANSFORM_LABELS[t])

_SET_GROUPS: dict[str, tuple[str, ...]] = {
    "deg": ("deg",),
    "geo": ("geo",),
    "geo_deg": ("geo", "deg"),
    "geo_clr": ("geo", "clr"),
    "geo_clr_deg": ("geo", "clr", "deg"),
}
# Transforms of each named augmentation set (the authors' configs/aug/*.yaml).
AUG_SET_TRANSFORMS: dict[str, list[str]] = {
    name: [t for t in TRANSFORMS if any(t in GROUPS[g] for g in groups)] for name, groups in _SET_GROUPS.items()
}
# Vector data ([N, D, 1, 1], e.g. the 2-D disk of the tangent study): the additive transforms only
# (mixup, noise), which need no spatial structure or colour channels.
AUG_SET_TRANSFORMS["vec"] = ["mixup", "noise"]
# Label names of each named augmentation set: 3, 7, 10, 12 and 15 labels ('vec': 2).
AUG_SETS: dict[str, list[str]] = {
    name: [label for t in ts for label in TRANSFORM_LABELS[t]] for name, ts in AUG_SET_TRANSFORMS.items()
}

# Reference strengths (the authors' configs/aug/geo_clr_deg.yaml; their class defaults differ for
# blur_sigma_max (6), mixup_beta (1) and noise_std (1), but every config overrides them).
DEFAULT_STRENGTHS: dict[str, float] = dict(
    scale_std=0.2,           # log2 std of isotropic scaling
    rotate_max=1.0,          # rotation range, 1 = full circle (+-pi)
    aniso_std=0.2,           # log2 std of anisotropic scaling
    aniso_rotate_prob=0.5,   # probability that the anisotropy axis is rotated by rho
    translate_std=0.125,     # translation std relative to the image size
    brightness_std=0.2,      # brightness offset std
    contrast_std=0.5,        # log2 std of contrast
    hue_max=1.0,             # hue rotation range, 1 = full circle (+-pi)
    saturation_std=1.0,      # log2 std of saturation
    blur_sigma_max=3.0,      # blur sigma ~ U(0, blur_sigma_max)
    blur_kernel_size=11,     # odd blur kernel size
    mixup_beta=3.0,          # mixup weight ~ 0.5 * Beta(1, mixup_beta)
    noise_std=0.5,           # noise weight ~ U(0, noise_std)
)

# Low-pass filter of the sym6 wavelet (decomposition coefficients, as in EDM's augment.py).
SYM6 = (
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)


def ramped_p(p: float, it: int, ramp_iters: int) -> float:
    """Augmentation probability at (0-based) iteration `it`: p ramped linearly from 0.

    As the authors' feature-net training: `p * min(1, (it + 1) / ramp_iters)`; no ramp if
    ramp_iters <= 0.
    """
    if ramp_iters <= 0:
        return float(p)
    return float(p) * min(1.0, (it + 1) / ramp_iters)


# ----------------------------------------------------------------------------------------------
# Batched homogeneous matrices: every argument is a tensor of shape [N]; results are [N, 3, 3]
# (2-D, acting on (x, y, 1) in pixel units) or [N, 4, 4] (colour, acting on (r, g, b, 1)).

def _matrix(rows: Sequence[Sequence], ref: Tensor) -> Tensor:
    """Stack a nested list of scalars / [N] tensors into [N, R, K]."""
    elems = [e if isinstance(e, Tensor) else torch.full_like(ref, float(e)) for row in rows for e in row]
    return torch.stack(elems, dim=-1).reshape(ref.shape[0], len(rows), len(rows[0]))


def translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta: Tensor) -> Tensor:
    c, s = theta.cos(), theta.sin()
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def translate3d(t: Tensor) -> Tensor:
    """Add t to r, g and b."""
    return _matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s: Tensor) -> Tensor:
    """Multiply r, g and b by s."""
    return _matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def rotate3d(v: Sequence[float], theta: Tensor) -> Tensor:
    """Rotation by theta about the unit axis v (Rodrigues), homogeneous 4x4."""
    vx, vy, vz = (float(e) for e in v)
    s, c = theta.sin(), theta.cos()
    cc = 1 - c
    return _matrix([
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1],
    ], theta)


def _batch_eye(n: int, k: int, ref: Tensor) -> Tensor:
    return torch.eye(k, dtype=ref.dtype, device=ref.device).expand(n, k, k)


# ----------------------------------------------------------------------------------------------
# Image operations (pure functions of images and per-sample parameters).

def _upsample2x(x: Tensor, taps: Tensor) -> Tensor:
    """Separable 2x upsampling: zero insertion followed by convolution with `taps` ([K], sum
    sqrt 2), written as a stride-2 transposed convolution. [N, C, H, W] -> [N, C, 2H, 2W].

    Same samples as EDM's zero-stacking and correlation with the flipped taps (padding (K+1)//2).
    """
    C, K = x.shape[1], taps.numel()
    w = taps.to(x.dtype).repeat(C, 1)                                          # [C, K]
    q = K - 1 - (K + 1) // 2
    x = F.conv_transpose2d(x, w[:, None, None, :], stride=(1, 2), padding=(0, q), groups=C)
    return F.conv_transpose2d(x, w[:, None, :, None], stride=(2, 1), padding=(q, 0), groups=C)


def _downsample2x(x: Tensor, taps: Tensor) -> Tensor:
    """Separable 2x downsampling: correlation with `taps` ([K]) at stride 2. [N,C,H,W] -> [N,C,H',W']."""
    C, K = x.shape[1], taps.numel()
    w = taps.to(x.dtype).repeat(C, 1)
    x = F.conv2d(x, w[:, None, None, :], groups=C, stride=(1, 2), padding=(0, (K - 1) // 2))
    return F.conv2d(x, w[:, None, :, None], groups=C, stride=(2, 1), padding=((K - 1) // 2, 0))


def affine_warp(x: Tensor, G_inv: Tensor) -> Tensor:
    """Warp images by per-sample affine maps, as EDM's augmentation pipe (docs/method.md section 3.3).

    x: [N, C, H, W]. G_inv: [N, 3, 3], maps output pixel coordinates to input pixel coordinates,
    both with the origin at the image centre ((W-1)/2, (H-1)/2) and y pointing down.
    The image is reflect-padded, upsampled 2x with the sym6 filter, resampled bilinearly
    (zeros outside) and downsampled 2x with the same filter.

    EDM pads by the smallest margin the whole batch needs (clamped to W-1, H-1), which needs
    a device->host read; here the pad is always that maximum. Reflect padding by more pixels
    extends the same reflection, so the result agrees with EDM's up to rounding, needs no
    synchronisation and does not depend on the other samples of the batch.
    """
    N, C, H, W = x.shape
    if H < 2 or W < 2:
        raise ValueError(f"affine_warp needs images of at least 2x2 pixels, got {H}x{W}")
    taps = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    half = len(SYM6) // 4                                    # 3: crop of the output, in pixels
    mx, my = W - 1, H - 1                                    # reflect margins
    x = F.pad(x, [mx, mx, my, my], mode="reflect")
    x = _upsample2x(x, taps)                                 # [N, C, 2(H+2my), 2(W+2mx)]
    up_h, up_w = x.shape[2], x.shape[3]
    out_h, out_w = 2 * (H + 2 * half), 2 * (W + 2 * half)

    # Express G_inv in grid_sample's normalised coordinates (align_corners=False) of the
    # upsampled input and of the upsampled output. Symmetric padding keeps the centre in place.
    G = G_inv.to(x.dtype)
    one = torch.ones(N, dtype=x.dtype, device=x.device)
    G = scale2d(2 * one, 2 * one) @ G @ scale2d(one / 2, one / 2)            # upsampled pixel units
    G = translate2d(-0.5 * one, -0.5 * one) @ G @ translate2d(0.5 * one, 0.5 * one)
    G = scale2d(2 / up_w * one, 2 / up_h * one) @ G @ scale2d(out_w / 2 * one, out_h / 2 * one)
    grid = F.affine_grid(G[:, :2, :], [N, C, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    x = _downsample2x(x, taps)                               # [N, C, H + 2 half, W + 2 half]
    return x[:, :, half:-half, half:-half]


def color_transform(x: Tensor, M: Tensor) -> Tensor:
    """Apply per-sample 4x4 homogeneous colour matrices M [N, 4, 4] to x [N, C, H, W], C in {1, 3}.

    For one channel the rows r, g, b are averaged (as EDM): y = x * sum(mean_row[:3]) + mean_row[3].
    """
    N, C, H, W = x.shape
    M = M.to(x.dtype)
    x = x.reshape(N, C, H * W)
    if C == 3:
        x = M[:, :3, :3] @ x + M[:, :3, 3:]
    elif C == 1:
        m = M[:, :3, :].mean(dim=1, keepdim=True)                               # [N, 1, 4]
        x = x * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
    else:
        raise ValueError(f"colour transforms need 1 or 3 channels, got {C}")
    return x.reshape(N, C, H, W)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [N, K] for per-sample sigma [N] (sigma -> 0: a delta)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {kernel_size}")
    t = torch.arange(kernel_size, dtype=sigma.dtype, device=sigma.device) - kernel_size // 2
    k = torch.exp(-0.5 * (t / sigma.clamp_min(1e-12)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 11) -> Tensor:
    """Blur each image of x [N, C, H, W] with its own Gaussian sigma [N]; reflect padding.

    Separable (the 2-D kernel is the outer product of the 1-D one, as in the reference) and
    batched as one grouped convolution over the N*C planes.
    """
    N, C, H, W = x.shape
    r = kernel_size // 2
    if H <= r or W <= r:
        raise ValueError(f"reflect padding of {r} needs images larger than {r} pixels, got {H}x{W}")
    k = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(C, dim=0)   # [N*C, K]
    y = F.pad(x, [r, r, r, r], mode="reflect").reshape(1, N * C, H + 2 * r, W + 2 * r)
    y = F.conv2d(y, k[:, None, None, :], groups=N * C)
    y = F.conv2d(y, k[:, None, :, None], groups=N * C)
    return y.reshape(N, C, H, W)


def unit_shell(n: Tensor) -> Tensor:
    """sqrt(CHW) * n / ||n|| per sample: noise of RMS 1 with exactly norm sqrt(CHW). [N, ...]."""
    dim = n[0].numel()
    norm = n.flatten(1).norm(dim=1).reshape(-1, *([1] * (n.ndim - 1)))
    return math.sqrt(dim) * n / norm


# ----------------------------------------------------------------------------------------------
# The pipe.

class AugmentPipe:
    """Random augmentations with regression labels (docs/method.md section 3.3).

    Args:
        aug_set: named set of transforms, a key of AUG_SETS ('deg', 'geo', 'geo_deg', 'geo_clr',
            'geo_clr_deg'); the labels are that set's (AUG_SETS[aug_set], in LABEL_NAMES order).
        p: overall probability; transform t is on for a sample with probability p * multiplier_t.
            A plain attribute: the training loop sets it (see `ramped_p`).
        scale, rotate, aniso, translate, brightness, contrast, hue, saturation, blur, mixup,
        noise: per-transform probability multipliers; None means 1 for transforms of the set.
            A non-zero multiplier for a transform outside the set is an error.
        **strengths: overrides of DEFAULT_STRENGTHS (scale_std, rotate_max, ...).
    """

    def __init__(self, aug_set: str = "geo_clr_deg", p: float = 0.15, *,
                 scale: Optional[float] = None, rotate: Optional[float] = None,
                 aniso: Optional[float] = None, translate: Optional[float] = None,
                 brightness: Optional[float] = None, contrast: Optional[float] = None,
                 hue: Optional[float] = None, saturation: Optional[float] = None,
                 blur: Optional[float] = None, mixup: Optional[float] = None,
                 noise: Optional[float] = None, **strengths: float):
        if aug_set not in AUG_SETS:
            raise ValueError(f"unknown aug_set {aug_set!r}; expected one of {sorted(AUG_SETS)}")
        unknown = set(strengths) - set(DEFAULT_STRENGTHS)
        if unknown:
            raise ValueError(f"unknown augmentation settings {sorted(unknown)}; "
                             f"expected multipliers {list(TRANSFORMS)} or strengths {list(DEFAULT_STRENGTHS)}")
        self.aug_set = aug_set
        self.p = float(p)
        self.transforms: tuple[str, ...] = tuple(AUG_SET_TRANSFORMS[aug_set])
        given = dict(scale=scale, rotate=rotate, aniso=aniso, translate=translate, brightness=brightness,
                     contrast=contrast, hue=hue, saturation=saturation, blur=blur, mixup=mixup, noise=noise)
        self.multipliers: dict[str, float] = {}
        for t in TRANSFORMS:
            m = given[t]
            if t in self.transforms:
                self.multipliers[t] = 1.0 if m is None else float(m)
            elif m:
                raise ValueError(f"transform {t!r} is not part of aug_set {aug_set!r} ({list(self.transforms)})")
        s = {**DEFAULT_STRENGTHS, **strengths}
        self.scale_std = float(s["scale_std"])
        self.rotate_max = float(s["rotate_max"])
        self.aniso_std = float(s["aniso_std"])
        self.aniso_rotate_prob = float(s["aniso_rotate_prob"])
        self.translate_std = float(s["translate_std"])
        self.brightness_std = float(s["brightness_std"])
        self.contrast_std = float(s["contrast_std"])
        self.hue_max = float(s["hue_max"])
        self.saturation_std = float(s["saturation_std"])
        self.blur_sigma_max = float(s["blur_sigma_max"])
        self.blur_kernel_size = int(s["blur_kernel_size"])
        self.mixup_beta = float(s["mixup_beta"])
        self.noise_std = float(s["noise_std"])
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be a positive odd integer, got {self.blur_kernel_size}")
        if self.mixup_beta <= 0:
            raise ValueError(f"mixup_beta must be positive, got {self.mixup_beta}")

    # -- label layout ---------------------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        return list(AUG_SETS[self.aug_set])

    @property
    def num_labels(self) -> int:
        return len(AUG_SETS[self.aug_set])

    def __repr__(self) -> str:
        strengths = ", ".join(f"{k}={getattr(self, k)}" for k in DEFAULT_STRENGTHS)
        return f"AugmentPipe(aug_set={self.aug_set!r}, p={self.p}, multipliers={self.multipliers}, {strengths})"

    # -- parameters -----------------------------------------------------------------------------

    def sample_params(self, n: int, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device | str] = None,
                      shape: Optional[Sequence[int]] = None) -> dict[str, Tensor]:
        """Draw random parameters for n samples (see the module docstring for the keys).

        shape: (C, H, W) of the images; needed for the noise direction when 'noise' is in the set.
        The on-masks are `U(0,1) < p * multiplier`, independent per sample and transform.
        """
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")

        def rand(*size: int) -> Tensor:
            return torch.rand(size, generator=generator, device=device)

        def randn(*size: int) -> Tensor:
            return torch.randn(size, generator=generator, device=device)

        out: dict[str, Tensor] = {}
        for t in self.transforms:
            out[f"{t}_on"] = rand(n) < self.p * self.multipliers[t]
            if t in ("scale", "brightness", "contrast", "saturation"):
                out[t] = randn(n)
            elif t == "rotate":
                out[t] = (rand(n) * 2 - 1) * (math.pi * self.rotate_max)
            elif t == "hue":
                out[t] = (rand(n) * 2 - 1) * (math.pi * self.hue_max)
            elif t == "aniso":
                out[t] = randn(n)
                rho = (rand(n) * 2 - 1) * math.pi
                out["aniso_angle"] = torch.where(rand(n) < self.aniso_rotate_prob, rho, torch.zeros_like(rho))
            elif t == "translate":
                out[t] = randn(n, 2)
            elif t == "blur":
                out[t] = rand(n) * self.blur_sigma_max
            elif t == "mixup":
                # Beta(1, b) by inversion of its CDF 1 - (1 - w)^b.
                out[t] = 0.5 * (1 - rand(n) ** (1.0 / self.mixup_beta))
            elif t == "noise":
                if shape is None:
                    raise ValueError("sample_params needs shape=(C, H, W) when 'noise' is in the set")
                out[t] = rand(n) * self.noise_std
                out["noise_dir"] = randn(n, *tuple(shape))
        return out

    def make_params(self, n: int, *, device: Optional[torch.device | str] = None,
                    shape: Optional[Sequence[int]] = None, generator: Optional[torch.Generator] = None,
                    **values) -> dict[str, Tensor]:
        """Parameters with only the named transforms on, at the given values (floats or [n] tensors).

        Example: `pipe.make_params(4, brightness=0.5)`; `translate=(w0, w1)` or an [n, 2] tensor;
        `aniso=w, aniso_angle=rho`; `noise=w` draws the direction from `generator` (needs `shape`)
        unless `noise_dir` ([n, C, H, W]) is given. Every other transform is off.
        """
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        extra = {"aniso_angle", "noise_dir"}
        for k in values:
            if k in extra:
                continue
            if k not in TRANSFORMS:
                raise ValueError(f"unknown transform {k!r}; expected one of {list(TRANSFORMS)} or {sorted(extra)}")
            if k not in self.transforms:
                raise ValueError(f"transform {k!r} is not part of aug_set {self.aug_set!r} ({list(self.transforms)})")

        def vec(v, *size: int) -> Tensor:
            return torch.as_tensor(v, dtype=torch.float32, device=device).expand(n, *size).clone()

        out: dict[str, Tensor] = {}
        for t in self.transforms:
            on = t in values
            size = (2,) if t == "translate" else ()
            out[f"{t}_on"] = torch.full((n,), on, dtype=torch.bool, device=device)
            out[t] = vec(values[t], *size) if on else torch.zeros((n, *size), device=device)
            if t == "aniso":
                out["aniso_angle"] = vec(values.get("aniso_angle", 0.0))
            if t == "noise":
                if "noise_dir" in values:
                    out["noise_dir"] = torch.as_tensor(values["noise_dir"], dtype=torch.float32, device=device)
                elif on or shape is not None:
                    if shape is None:
                        raise ValueError("make_params(noise=...) needs shape=(C, H, W) or noise_dir")
                    out["noise_dir"] = torch.randn((n, *tuple(shape)), generator=generator, device=device)
                # else: no direction; `apply` accepts that only while noise is off.
        return out

    # -- application ----------------------------------------------------------------------------

    def _masked(self, params: Mapping[str, Tensor], t: str, dtype: torch.dtype) -> Tensor:
        """Value of transform t, zero where it is off. [N] (or [N, 2] for translate)."""
        try:
            v, on = params[t], params[f"{t}_on"]
        except KeyError as e:
            raise ValueError(f"params lack key {e.args[0]!r} needed by aug_set {self.aug_set!r}") from None
        v = v.to(dtype)
        on = on.reshape(on.shape[0], *([1] * (v.ndim - 1)))
        return torch.where(on, v, torch.zeros_like(v))

    def apply(self, x: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Augment x [N, C, H, W] with given parameters; returns (x_aug [N, C, H, W], labels [N, L]).

        Deterministic. Order: geometric warp, colour matrix, blur, mixup + noise (module docstring).
        """
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"expected a floating [N, C, H, W] tensor, got {tuple(x.shape)} {x.dtype}")
        N, C, H, W = x.shape
        dt = x.dtype
        one = torch.ones(N, dtype=dt, device=x.device)
        labels: dict[str, Tensor] = {}
        ts = self.transforms

        # Geometric: G_inv maps output to input coordinates, composed in EDM's order.
        geo = [t for t in ts if t in GROUPS["geo"]]
        if geo:
            G_inv = _batch_eye(N, 3, one)
            any_on = torch.zeros(N, dtype=torch.bool, device=x.device)
            if "scale" in ts:
                w = self._masked(params, "scale", dt)
                s = torch.exp2(w * self.scale_std)
                G_inv = G_inv @ scale2d(1 / s, 1 / s)
                labels["scale"] = w
            if "rotate" in ts:
                theta = self._masked(params, "rotate", dt)
                G_inv = G_inv @ rotate2d(theta)          # EDM: rotate2d_inv(-theta)
                labels["rotate_cos"], labels["rotate_sin"] = theta.cos() - 1, theta.sin()
            if "aniso" in ts:
                w = self._masked(params, "aniso", dt)
                if "aniso_angle" not in params:
                    raise ValueError("params lack key 'aniso_angle' needed by the aniso transform")
                rho = params["aniso_angle"].to(dt)
                s = torch.exp2(w * self.aniso_std)
                G_inv = G_inv @ rotate2d(-rho) @ scale2d(1 / s, s) @ rotate2d(rho)
                labels["aniso_cos"], labels["aniso_sin"] = w * rho.cos(), w * rho.sin()
            if "translate" in ts:
                w = self._masked(params, "translate", dt)
                G_inv = G_inv @ translate2d(-w[:, 0] * (W * self.translate_std), -w[:, 1] * (H * self.translate_std))
                labels["translate_x"], labels["translate_y"] = w[:, 0], w[:, 1]
            for t in geo:
                any_on = any_on | params[f"{t}_on"]
            # Samples with every geometric transform off pass unfiltered (the reference filters
            # the whole batch; the sym6 round trip is the identity up to rounding).
            x = torch.where(any_on[:, None, None, None], affine_warp(x, G_inv), x)

        # Colour: M acts on (r, g, b, 1); each transform multiplies from the left.
        if any(t in GROUPS["clr"] for t in ts):
            M = _batch_eye(N, 4, one)
            luma = (1 / math.sqrt(3),) * 3
            if "brightness" in ts:
                w = self._masked(params, "brightness", dt)
                M = translate3d(w * self.brightness_std) @ M
                labels["brightness"] = w
            if "contrast" in ts:
                w = self._masked(params, "contrast", dt)
                M = scale3d(torch.exp2(w * self.contrast_std)) @ M
                labels["contrast"] = w
            if "hue" in ts:
                theta = self._masked(params, "hue", dt)
                M = rotate3d(luma, theta) @ M
                labels["hue_cos"], labels["hue_sin"] = theta.cos() - 1, theta.sin()
            if "saturation" in ts:
                w = self._masked(params, "saturation", dt)
                a = torch.tensor([*luma, 0.0], dtype=dt, device=x.device)
                P = torch.outer(a, a)                                    # projection on the luma axis
                s = torch.exp2(w * self.saturation_std)[:, None, None]
                M = (P + (torch.eye(4, dtype=dt, device=x.device) - P) * s) @ M
                labels["saturation"] = w
            x = color_transform(x, M)

        # Blur.
        if "blur" in ts:
            sigma = self._masked(params, "blur", dt)
            on = params["blur_on"] & (sigma > 0)
            x = torch.where(on[:, None, None, None], gaussian_blur(x, sigma, self.blur_kernel_size), x)
            labels["blur"] = sigma

        # Additive: mixup with the reversed batch, then noise on the shell of radius w sqrt(CHW).
        if "mixup" in ts or "noise" in ts:
            eps = torch.zeros_like(x)
            if "mixup" in ts:
                w = self._masked(params, "mixup", dt)
                eps = eps + w[:, None, None, None] * (x.flip(0) - x)
                labels["mixup"] = w
            if "noise" in ts:
                w = self._masked(params, "noise", dt)
                if "noise_dir" in params:
                    n = params["noise_dir"].to(dt)
                    if n.shape != x.shape:
                        raise ValueError(f"noise_dir has shape {tuple(n.shape)}, images {tuple(x.shape)}")
                    eps = eps + w[:, None, None, None] * unit_shell(n)
                elif bool(params["noise_on"].any()):   # only hand-made params get here (host read)
                    raise ValueError("params turn noise on but lack 'noise_dir'")
                labels["noise"] = w
            x = x + eps

        out = torch.stack([labels[name] for name in self.label_names], dim=1) if self.label_names \
            else x.new_zeros(N, 0)
        return x, out.to(torch.float32)

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Random augmentation of x [N, C, H, W]: returns (x_aug [N, C, H, W], labels [N, L])."""
        if x.ndim != 4:
            raise ValueError(f"expected [N, C, H, W] images, got shape {tuple(x.shape)}")
        params = self.sample_params(x.shape[0], generator=generator, device=x.device, shape=x.shape[1:])
        return self.apply(x, params)
