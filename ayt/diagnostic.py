"""Live tangent diagnostic: while a run trains, how much of its update direction lies along the data
manifold (the paper's tangent argument, docs/method.md section 6.2, measured every `diagnostic.every`
iterations).

For a fixed probe batch (x_0 [n, C, H, W] from the training set, its noise and noise levels drawn
once from a fixed seed), the run's own objective is evaluated at the current weights and the
output-space update direction is read off its gradient:

    u_b = -d l_b / d D_b,     D_b = f(x_t, t)_b the student output, l_b the per-sample loss

(ECT: along -(D_t - D_r); AYT: -w g; CCD / CT: -(1/t) T, or -(1/t) J_phi^T T in feature space). Its
decomposition (`ayt.analysis.decompose`) into the tangent space of the data manifold at x_0 gives the
logged fraction of ||u||^2 along the manifold. Tangent spaces: exact on the built-in shapes (from the
generating parameters, `shapes_tangent_basis`) and the 2-D disk (its plane); estimated by local PCA of
nearby training images (`local_pca_basis`) or by augmentation derivatives (`augment_tangent_basis`)
on other data. Bases are computed once, at the start of the run.

Logged with the metrics (metrics.jsonl), at iteration `it`:
    diag_tangent_fraction          mean over probes of the tangent share of ||u||^2
    diag_tangent_fraction_t_le_1   the same over probes with t <= 1 (near the data), and _t_gt_1
    diag_random_fraction           the share a random direction would have (mean rank / dim)
    diag_time_s                    wall-clock of this evaluation

The evaluation runs under a forked RNG with its own seed and never touches parameter gradients, so a
run trains bitwise-identically with the diagnostic on or off.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from torch import Tensor

from .analysis import augment_tangent_basis, decompose, local_pca_basis, shapes_tangent_basis

BASES = ("auto", "exact", "pca", "augment")


class _OutputCapture:
    """Wraps the network: each call returns its output as a fresh leaf requiring grad (recorded with the
    noise levels it was called at), so the gradient of a loss with respect to the output can be read."""

    def __init__(self, net: Callable):
        self.net, self.outputs, self.sigmas = net, [], []

    def __call__(self, x, sigma, class_labels=None):
        out = self.net(x, sigma, class_labels).detach().requires_grad_(True)
        self.outputs.append(out)
        self.sigmas.append(torch.as_tensor(sigma).detach())
        return out


def probe_tangent_basis(ds, idx: Tensor, x: Tensor, kind: str = "auto", reference: int = 2048,
                        neighbors: int = 32, dim: int = 8, seed: int = 0) -> Tensor:
    """Tangent bases at the probe images x = ds[idx] ([n, C, H, W]): [P, k] or [n, P, k] (see `decompose`).

    kind: "exact" (shapes: parameter Jacobian; disk: its plane), "pca" (local PCA over `reference`
    seeded training images, `neighbors` neighbours, `dim` directions), "augment" (augmentation
    derivatives, 1- or 3-channel images), "auto" (exact where known, else pca).
    """
    name = getattr(ds, "name", "")
    if kind == "auto":
        kind = "exact" if name in ("shapes", "disk") else "pca"
    if kind == "exact":
        if name == "shapes":
            return shapes_tangent_basis(ds.params[idx].double(), ds.resolution).float()
        if name == "disk":
            return ds.data.basis.float()
        raise ValueError(f"diagnostic.basis=exact: the tangent space of {name or type(ds).__name__!r} is unknown "
                         "(exact only on the built-in shapes and disk); use pca or augment")
    if kind == "pca":
        m = min(reference, len(ds))
        ref_idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 1))[:m]
        ref = torch.stack([ds[int(i)][0] for i in ref_idx])
        return local_pca_basis(x.cpu(), ref, k_neighbors=min(neighbors, m), dim=dim)
    if kind == "augment":
        return augment_tangent_basis(x.cpu())
    raise ValueError(f"unknown diagnostic.basis {kind!r}; expected one of {BASES}")


def _mean(v: Tensor) -> Optional[float]:
    return round(float(v.mean()), 6) if v.numel() else None


class TangentDiagnostic:
    """The diagnostic of one run: `diag(model, it) -> dict` of the logged values (see the module doc).

    objective: the run's objective (`objective(net, x_0, labels, it, generator, teacher)`); ds: its
    dataset; n probes drawn with `seed`; label_dim: 0 for unconditional runs.
    """

    def __init__(self, objective: Callable, ds, device: torch.device, n: int = 32, basis: str = "auto",
                 reference: int = 2048, neighbors: int = 32, dim: int = 8, seed: int = 0, label_dim: int = 0):
        self.objective, self.device, self.seed = objective, torch.device(device), seed
        n = min(n, len(ds))
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        items = [ds[int(i)] for i in idx]
        self.x_0 = torch.stack([x for x, _ in items]).to(self.device)                    # [n, C, H, W]
        self.labels = torch.stack([y for _, y in items]).to(self.device) if label_dim else None
        self.basis = probe_tangent_basis(ds, idx, self.x_0, basis, reference, neighbors, dim, seed).to(self.device)
        P = self.x_0[0].numel()
        ranks = (self.basis.abs().sum(-2) > 0).sum(-1).float()                          # [n] or []
        self.random_fraction = round(float(ranks.mean()) / P, 6)

    def direction(self, model: torch.nn.Module, it: int) -> tuple[Tensor, Tensor]:
        """(u [n, C, H, W], t [n]): the output-space update direction at the probes and their noise levels."""
        capture = _OutputCapture(model)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed + 0xD1A6)
            gen = torch.Generator(self.device).manual_seed(self.seed + 0xD1A7)
            loss, _ = self.objective(capture, self.x_0, self.labels, it, gen, teacher=model)
        if len(capture.outputs) != 1:
            raise RuntimeError(f"the objective called the network {len(capture.outputs)} times with graph; "
                               "the diagnostic expects one student forward")
        (G,) = torch.autograd.grad(loss.float().sum(), capture.outputs[0])
        return -G.detach(), capture.sigmas[0].reshape(-1).to(self.device)

    def __call__(self, model: torch.nn.Module, it: int) -> dict:
        start = time.perf_counter()
        u, t = self.direction(model, it)
        tangent, _ = decompose(u, self.basis)                                          # [n]
        return {"diag_tangent_fraction": _mean(tangent),
                "diag_tangent_fraction_t_le_1": _mean(tangent[t <= 1]),
                "diag_tangent_fraction_t_gt_1": _mean(tangent[t > 1]),
                "diag_random_fraction": self.random_fraction,
                "diag_time_s": round(time.perf_counter() - start, 4)}


def build_diagnostic(cfg, objective: Callable, ds, device: torch.device, label_dim: int) -> Optional[TangentDiagnostic]:
    """The run's diagnostic, or None when diagnostic.every is 0."""
    dc = cfg.diagnostic
    if not dc.every:
        return None
    return TangentDiagnostic(objective, ds, device, dc.samples, dc.basis, dc.pca_reference, dc.pca_neighbors,
                             dc.pca_dim, cfg.seed, label_dim)
