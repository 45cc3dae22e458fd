"""Distances and the Align-Your-Tangent update.

docs/method.md sections 2, 3.2 and 4: pseudo-Huber, the manifold feature distance (MFD) and the AYT update.
Every distance returns a per-sample tensor [N]; reductions happen in the training loop.

Legend: D = D_t the student output [N, C, H, W] (with graph), D_r the teacher output (detached),
w = 1 / (t - r) [N], phi the frozen feature network with `phi.features(x) -> list[Tensor]`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample [N] (norm over all non-batch dims); c = 0 is the L2 norm."""
    sq = (a - b).flatten(1).square().sum(1)
    if c > 0:
        return (sq + c * c).sqrt() - c
    return sq.sqrt()


def mfd_from_features(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor],
                      eps: float = 1e-5, weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Manifold feature distance from precomputed features (docs/method.md section 3.2).

    MFD(a, b) = sum_l w_l sum_c [ sqrt( sum_{h,w} (phi_lc(a) - phi_lc(b))^2 + eps^2 ) - eps ],
    a per-channel pseudo-Huber over spatial positions. feats_*[l]: [N, C_l, H_l, W_l]. Returns [N].
    """
    if len(feats_a) != len(feats_b):
        raise ValueError(f"feature lists differ in length: {len(feats_a)} vs {len(feats_b)}")
    if weights is not None and len(weights) != len(feats_a):
        raise ValueError(f"{len(weights)} weights given for {len(feats_a)} feature tensors")
    total = 0
    for l, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        per_channel = ((fa - fb).square().flatten(2).sum(2) + eps * eps).sqrt() - eps  # [N, C_l]
        total = total + (1.0 if weights is None else weights[l]) * per_channel.sum(1)
    return total


def mfd(phi, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5,
        weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """MFD(a, b) [N] with ONE batched forward of phi on cat([a, b]) (phi must be in eval mode so that
    BatchNorm uses its running statistics and the batch split is exact)."""
    n = a.shape[0]
    feats = phi.features(torch.cat([a, b]))
    return mfd_from_features([f[:n] for f in feats], [f[n:] for f in feats], eps, weights)


def normalize_per_sample(g: torch.Tensor, min_norm: float = 1e-5) -> torch.Tensor:
    """g_b / max(||g_b||_2, min_norm), norm over all non-batch entries (docs/method.md section 4.1, step 2)."""
    norm = g.flatten(1).norm(dim=1).clamp(min=min_norm)
    return g / norm.view(-1, *([1] * (g.ndim - 1)))


def distance_and_direction(distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           D: torch.Tensor, D_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance(D, D_r) [N] detached, unit-norm direction g [N, C, H, W] of d/dD mean_b distance(D_b, D_r_b)),
    both at a detached copy of D, from one forward and one backward to the input (the distance
    network's parameters must not require grad)."""
    with torch.enable_grad():
        D_in = D.detach().requires_grad_(True)
        d = distance(D_in, D_r.detach())
        (G,) = torch.autograd.grad(d.mean(), D_in)
    return d.detach(), normalize_per_sample(G)


def distance_direction(distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       D: torch.Tensor, D_r: torch.Tensor) -> torch.Tensor:
    """Unit-norm direction g [N, C, H, W] of d/dD mean_b distance(D_b, D_r_b), at a detached copy of D."""
    return distance_and_direction(distance, D, D_r)[1]


def direction_surrogate(D: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Surrogate L = mean_b w_b * 0.5 * ||D_b - stopgrad(D_b - g_b)||^2 (docs/method.md section 4.1, step 3).

    Its gradient with respect to D_b is exactly (w_b / B) g_b: the step size of ECT's (c = 0)
    gradient, the direction of the distance's gradient. Returns per-sample values [N] whose mean is L.
    """
    target = (D - g).detach()
    return w * 0.5 * (D - target).square().flatten(1).sum(1)


def ect_mfd_ramp(it: int, ramp_iters: int = 5000) -> float:
    """min(1, (it + 1) / ramp_iters): the weight ramp of the MFD term in mode "ect+mfd"."""
    return min(1.0, (it + 1) / max(ramp_iters, 1))


class LPIPSDistance(torch.nn.Module):
    """LPIPS(VGG) as a per-sample distance [N], for the LPIPS baseline of the AYT update.

    Needs the optional `lpips` package (pip install 'ayt[lpips]') and its pretrained weights, which
    the package downloads on first use (torchvision VGG16 weights) - unavailable offline.
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        try:
            import lpips  # noqa: F401
        except ImportError as e:
            raise ImportError("the LPIPS baseline needs the optional 'lpips' package: pip install 'ayt[lpips]'") from e
        try:
            self.lpips = lpips.LPIPS(net=net, verbose=False)
        except Exception as e:  # network access for the VGG backbone weights
            raise RuntimeError(
                f"could not build LPIPS({net}): its pretrained weights are missing and could not be downloaded "
                f"(torch hub cache: {torch.hub.get_dir()}). Original error: {e}") from e
        self.lpips.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b).flatten()


class MFD(torch.nn.Module):
    """The manifold feature distance as a module: MFD(a, b) [N] for a frozen feature network phi."""

    def __init__(self, phi: torch.nn.Module, eps: float = 1e-5, weights: Optional[Sequence[float]] = None):
        super().__init__()
        if any(p.requires_grad for p in phi.parameters()):
            raise ValueError("the MFD feature network must be frozen (eval mode, requires_grad=False): use ayt.features.freeze")
        self.phi, self.eps, self.weights = phi, eps, weights

    def train(self, mode: bool = True):
        super().train(mode)
        self.phi.eval()  # phi is always used in eval mode (docs/method.md section 3.1)
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mfd(self.phi, a, b, self.eps, self.weights)
