"""Tangent analysis: where do consistency-training updates push the model's output?

The paper's tangent study (docs/method.md section 6.2), made quantitative. Notation
(docs/method.md sections 1-4):

    x_0, eps   data [N, C, H, W] and one Gaussian draw of the same shape; x_t = x_0 + t eps
    f(x, t)    the consistency model (EDMPrecond); D_t = f(x_t, t), D_r = f(x_r, r), r < t
    w          the ECT weight 1 / (t - r)
    phi, MFD   the frozen feature network and its manifold feature distance (ayt.losses.MFD)
    B          an orthonormal basis [P, k] (or one per sample, [N, P, k]) of the data manifold's
               tangent space, P = C*H*W; its orthogonal complement is the normal space

Tangents and update directions (all [N, C, H, W]):

    discrete CM tangent     T_d = (f(x_t, t) - f(x_r, r)) / (t - r)               (ECT's finite difference)
    continuous CM tangent   T_c = d/dt f(x_0 + t eps, t)                          (forward-mode JVP)
    ECT update direction    u_cm  = -w (D_t - D_r) / ||D_t - D_r||                (c_mult = 0)
    AYT update direction    u_ayt = -w g,  g = grad_D MFD(D, D_r) / ||grad_D MFD||  at D = D_t

u_cm and u_ayt are "output-space update directions": -B dL/dD_t of the respective loss for a
batch of B samples (docs/method.md section 4.1: both have norm w), i.e. the direction in which one
gradient step moves the output D_t. u_cm = -w T_d / ||T_d||, so its decomposition equals T_d's.

Measures: `decompose` (fraction of ||v||^2 in the tangent / normal space), `toward_manifold_cosine`
(cos between v and the displacement from the output to its nearest manifold point), and
`update_cosines` / `oscillation` (cos between successive changes f_{k+1}(x) - f_k(x) of the same
output across checkpoints). Tangent spaces: exact for the built-in 2-D disk (`ayt.data.DiskData`)
and shapes (`shapes_tangent_basis`, from the generating parameters), estimated for real data
(`augment_tangent_basis`, `local_pca_basis`).

The paper's hypothesis: near convergence CM tangents lie mostly in the tangent space (they move the
output along the manifold and oscillate), while MFD tangents point toward the manifold.

Every network here runs in eval mode (no dropout): the analysis asks for the deterministic function.
Command line (the studies; each writes <out>/results.json and <out>/figures/*.png):

    python -m ayt.analysis disk-study --run ect=runs/disk-ect --run ayt=runs/disk-ayt --out runs/disk-study
    python -m ayt.analysis shapes-study --run ect=runs/mini-ect --run ayt=runs/mini-ayt --out runs/shapes-study
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import checkpoint as ck
from . import consistency as C
from .config import from_dict
from .losses import MFD, distance_direction
from .progress import Progress
from .runs import build_dataset, build_diffusion_net, load_feature_net

__all__ = [
    "consistency_pair", "discrete_tangent", "continuous_tangent", "cm_update_direction", "ayt_tangent", "tangent_grid",
    "decompose", "toward_manifold_cosine", "cosine", "orthonormal_basis", "shapes_tangent_basis",
    "augment_tangent_basis", "local_pca_basis", "update_cosines", "checkpoint_outputs", "oscillation",
    "tangent_study", "disk_study", "shapes_study", "DEFAULT_TS", "SHAPES_CONTINUOUS_PARAMS",
]

TimeLike = Union[float, Tensor]


# ----------------------------------------------------------------------------------------------
# Helpers

def _flat(v: Tensor) -> Tensor:
    """[N, ...] -> [N, P]."""
    return v.reshape(v.shape[0], -1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """[N] -> [N, 1, ..., 1] broadcasting against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _noise_levels(t: TimeLike, n: int, like: Tensor) -> Tensor:
    """A float or [N] tensor of noise levels as a float32 vector [N] on like's device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device).reshape(-1)
    if t.numel() == 1:
        return t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"noise levels must be a scalar or hold one value per sample ({n}), got {t.numel()}")
    return t


def _check_pair(x_0: Tensor, eps: Tensor) -> None:
    if x_0.shape != eps.shape or x_0.ndim < 2:
        raise ValueError(f"x_0 and eps must have the same [N, ...] shape, got {tuple(x_0.shape)} and {tuple(eps.shape)}")


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-sample cosine similarity [N] of a, b [N, ...]; 0 where either vector is zero."""
    a, b = _flat(a).double(), _flat(b).double()
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > eps, (a * b).sum(1) / den.clamp_min(eps), torch.zeros_like(den)).float()


# ----------------------------------------------------------------------------------------------
# Tangents and update directions

@torch.no_grad()
def consistency_pair(net: Callable, x_0: Tensor, eps: Tensor, t: TimeLike, r: TimeLike,
                     class_labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(D_t, D_r) = (f(x_0 + t eps, t), f(x_0 + r eps, r)), each [N, C, H, W], without graph.

    x_0, eps: [N, C, H, W]; t, r: floats or [N] with 0 <= r < t. Where r = 0 the teacher is x_0
    (the boundary condition f(x_0, 0) = x_0, as in ECT's loss).
    """
    _check_pair(x_0, eps)
    n = x_0.shape[0]
    t, r = _noise_levels(t, n, x_0), _noise_levels(r, n, x_0)
    if bool((r < 0).any()) or bool((t <= r).any()):
        raise ValueError("need 0 <= r < t")
    D_t = net(x_0 + _per_sample(t, x_0) * eps, t, class_labels)
    D_r = net(x_0 + _per_sample(r, x_0) * eps, r.clamp_min(C.SIGMA_MIN * 1e-3), class_labels)
    return D_t, torch.where(_per_sample(r, x_0) > 0, D_r, x_0)


def discrete_tangent(net: Callable, x_0: Tensor, eps: Tensor, t: TimeLike, r: TimeLike,
                     class_labels: Optional[Tensor] = None) -> Tensor:
    """ECT's discrete CM tangent (f(x_t, t) - f(x_r, r)) / (t - r), [N, C, H, W].

    x_0, eps: [N, C, H, W]; t, r: floats or [N] with 0 <= r < t; f(x_r, 0) = x_0 (`consistency_pair`).
    """
    D_t, D_r = consistency_pair(net, x_0, eps, t, r, class_labels)
    n = x_0.shape[0]
    return (D_t - D_r) / _per_sample(_noise_levels(t, n, x_0) - _noise_levels(r, n, x_0), x_0)


def continuous_tangent(net: Callable, x_0: Tensor, eps: Tensor, t: TimeLike,
                       class_labels: Optional[Tensor] = None) -> Tensor:
    """The continuous CM tangent d/dt f(x_0 + t eps, t), [N, C, H, W], by forward-mode autodiff.

    This is the tangent of continuous-time consistency training along the *conditional* PF-ODE
    direction dx_t/dt = eps (x_t = x_0 + t eps), i.e. J_x f(x_t, t) eps + df/dt; the limit r -> t of
    `discrete_tangent`. One `torch.func.jvp` with tangent 1 for every sample's t (samples are
    independent in eval mode). No graph is kept.
    """
    _check_pair(x_0, eps)
    t = _noise_levels(t, x_0.shape[0], x_0)

    def f_of_t(s: Tensor) -> Tensor:
        return net(x_0 + _per_sample(s, x_0) * eps, s, class_labels)

    with torch.no_grad():
        _, tangent = torch.func.jvp(f_of_t, (t,), (torch.ones_like(t),))
    return tangent


def cm_update_direction(D_t: Tensor, D_r: Tensor, w: Tensor, c: float = 0.0) -> Tensor:
    """ECT's output-space update direction -w (D_t - D_r) / sqrt(||D_t - D_r||^2 + c^2), [N, C, H, W].

    = -B dL_ECT/dD_t for the pseudo-Huber loss with constant c (c = 0, the reference: a vector of
    norm w along -(D_t - D_r), i.e. along minus the discrete tangent). D_t, D_r: [N, C, H, W]; w: [N].
    Where D_t == D_r the direction is 0.
    """
    diff = (D_t - D_r).detach()
    norm = (_flat(diff).square().sum(1) + c * c).sqrt().clamp_min(1e-12)
    return -_per_sample(w / norm, diff) * diff


def ayt_tangent(distance: Callable[[Tensor, Tensor], Tensor], D_t: Tensor, D_r: Tensor, w: Tensor) -> Tensor:
    """AYT's output-space update direction -w g, g = grad_D distance(D, D_r) / ||.|| at D = D_t, [N, C, H, W].

    Sign convention: the direction in which the AYT surrogate moves the output (the *negative*
    gradient: `direction_surrogate` has gradient (w/B) g with respect to D_t, and a gradient step
    moves D_t along -g). Norm w per sample, like `cm_update_direction` (docs/method.md section 4.1).
    distance: a frozen per-sample distance, e.g. `ayt.losses.MFD(phi)`. w: [N].
    """
    g = distance_direction(distance, D_t.detach().float(), D_r.detach().float())
    return -_per_sample(w, g) * g


def tangent_grid(net: Callable, x_0: Tensor, eps: Tensor, ts: Sequence[float],
                 distance: Optional[Callable] = None, schedule: Optional[C.TRSchedule] = None,
                 class_labels: Optional[Tensor] = None, it: int = 0, jvp: bool = True) -> dict[str, Tensor]:
    """Rows of the paper's tangent figure for one trajectory (or a few), at the noise levels ts.

    x_0, eps: [N, C, H, W] (N = 1 for the figure); r = ECT's r(t) from `schedule` (default: the AYT
    reference TRSchedule(), q = 256, stage `stage_at(schedule, it)`). Returns, each [K, N, C, H, W]
    for K = len(ts) (plus 'ts' and 'rs' [K]):
      'x_t'            x_0 + t eps
      'f'              f(x_t, t)
      'cm_tangent'     discrete CM tangent (f(x_t, t) - f(x_r, r)) / (t - r)
      'cm_tangent_jvp' continuous CM tangent d/dt f(x_0 + t eps, t) (only when `jvp`: a forward-mode
                       pass, several times the cost of the other rows together)
      'cm_direction'   ECT's update direction -w (D_t - D_r)/||D_t - D_r||
      'ayt_direction'  AYT's update direction -w g (only when `distance` is given)
    """
    _check_pair(x_0, eps)
    schedule = C.TRSchedule() if schedule is None else schedule
    stage = C.stage_at(schedule, it)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("x_t", "f", "cm_tangent", "cm_tangent_jvp", "cm_direction")
                                     if jvp or k != "cm_tangent_jvp"}
    if distance is not None:
        rows["ayt_direction"] = []
    n = x_0.shape[0]
    rs = []
    for t_val in ts:
        t = _noise_levels(float(t_val), n, x_0)
        r = C.t_to_r(t, stage, schedule.q, schedule.k, schedule.b, schedule.mapping, schedule.const_floor)
        rs.append(float(r[0]))
        D_t, D_r = consistency_pair(net, x_0, eps, t, r, class_labels)
        w = C.ect_weight(t, r)
        rows["x_t"].append(x_0 + _per_sample(t, x_0) * eps)
        rows["f"].append(D_t)
        rows["cm_tangent"].append((D_t - D_r) / _per_sample(t - r, x_0))
        if jvp:
            rows["cm_tangent_jvp"].append(continuous_tangent(net, x_0, eps, t, class_labels))
        rows["cm_direction"].append(cm_update_direction(D_t, D_r, w))
        if distance is not None:
            rows["ayt_direction"].append(ayt_tangent(distance, D_t, D_r, w))
    out = {k: torch.stack(v) for k, v in rows.items()}
    out["ts"] = torch.tensor([float(t) for t in ts])
    out["rs"] = torch.tensor(rs)
    return out


# ----------------------------------------------------------------------------------------------
# Decomposition into tangent and normal parts

def decompose(v: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Fractions of ||v||^2 in span(basis) and in its orthogonal complement, per sample: two [N].

    v: [N, ...] flattening to P entries; basis: [P, k] (one tangent space for all samples, e.g. the
    flat disk) or [N, P, k] (one per sample), with orthonormal columns (zero columns are allowed and
    ignored: `shapes_tangent_basis` pads with them). The fractions sum to 1; v = 0 gives (0, 0).
    """
    vf = _flat(v).double()
    B = basis.to(device=v.device, dtype=torch.float64)
    if B.ndim == 2:
        if B.shape[0] != vf.shape[1]:
            raise ValueError(f"basis has {B.shape[0]} rows, vectors have {vf.shape[1]} entries")
        coef = vf @ B                                                   # [N, k]
    elif B.ndim == 3:
        if B.shape[0] != vf.shape[0] or B.shape[1] != vf.shape[1]:
            raise ValueError(f"per-sample basis {tuple(B.shape)} does not fit vectors {tuple(vf.shape)}")
        coef = torch.einsum("np,npk->nk", vf, B)
    else:
        raise ValueError(f"basis must be [P, k] or [N, P, k], got {tuple(basis.shape)}")
    total = vf.square().sum(1)
    tangent = torch.where(total > 0, (coef.square().sum(1) / total.clamp_min(1e-300)).clamp(0, 1),
                          torch.zeros_like(total))
    normal = torch.where(total > 0, 1 - tangent, torch.zeros_like(total))
    return tangent.float(), normal.float()


def toward_manifold_cosine(v: Tensor, x: Tensor, project_fn: Callable[[Tensor], Tensor],
                           atol: float = 1e-5) -> Tensor:
    """cos(v, proj(x) - x) per sample [N]: +1 when v points straight at the nearest manifold point.

    v, x: [N, ...]; project_fn maps x to its nearest point on the manifold (same shape), e.g.
    `DiskData.project`. 0 where x lies on the manifold, i.e. ||proj(x) - x|| <= atol * max(1, ||x||)
    (below that the displacement is rounding noise of the projection), or where v = 0.
    """
    d = project_fn(x) - x
    dn, xn = _flat(d).norm(dim=1), _flat(x).norm(dim=1)
    on = dn <= atol * xn.clamp_min(1.0)
    return torch.where(on, torch.zeros_like(dn), cosine(v, d))


# ----------------------------------------------------------------------------------------------
# Tangent spaces of image manifolds

def orthonormal_basis(J: Tensor, rtol: float = 1e-5) -> Tensor:
    """Orthonormal bases of the column spaces of J [N, P, m], as [N, P, k], by SVD with a rank cut.

    Columns with singular value <= rtol * (largest singular value of that sample) are dropped; a
    sample of lower rank than the batch maximum k gets zero columns at the end.
    """
    if J.ndim != 3:
        raise ValueError(f"J must be [N, P, m], got {tuple(J.shape)}")
    U, S, _ = torch.linalg.svd(J.double(), full_matrices=False)       # U [N, P, min(P, m)], S descending
    keep = S > rtol * S[:, :1].clamp_min(1e-300)
    keep &= S > 0
    k = max(int(keep.sum(1).max()), 1) if keep.numel() else 1
    return (U * keep[:, None, :].to(U.dtype))[:, :, :k].to(J.dtype)


# Continuous generating parameters of the built-in shapes (ayt.data.SHAPE_PARAM_NAMES minus the kind).
SHAPES_CONTINUOUS_PARAMS: tuple[str, ...] = ("cx", "cy", "size", "cos_ktheta", "sin_ktheta",
                                             "fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b")


def shapes_tangent_basis(params: Tensor, resolution: int = 16,
                         names: Sequence[str] = SHAPES_CONTINUOUS_PARAMS, rtol: float = 1e-5) -> Tensor:
    """Exact tangent spaces of the shapes manifold at `render_shapes(params)`: orthonormal [N, 3*R*R, k].

    The columns of the Jacobian d render_shapes / d params[:, names] (forward-mode autodiff, one JVP
    per parameter) span the tangent space of the image manifold at each sample; `orthonormal_basis`
    orthonormalises them with a rank cut (the orientation pair (cos k theta, sin k theta) gives one
    direction, a disk none; colour parameters are tangent too, since colours are uniformly random).
    params: [N, 14] (columns ayt.data.SHAPE_PARAM_NAMES; float64 for precise bases). k <= len(names);
    samples of lower rank get zero columns (see `decompose`).
    """
    from .data import SHAPE_PARAM_NAMES, render_shapes
    if params.ndim != 2 or params.shape[1] != len(SHAPE_PARAM_NAMES):
        raise ValueError(f"params must be [N, {len(SHAPE_PARAM_NAMES)}], got {tuple(params.shape)}")
    unknown = [k for k in names if k not in SHAPE_PARAM_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown shape parameter(s) {unknown}; expected names from {SHAPE_PARAM_NAMES}")
    cols = []
    for name in names:
        d = torch.zeros_like(params)
        d[:, SHAPE_PARAM_NAMES.index(name)] = 1
        with torch.no_grad():
            _, dx = torch.func.jvp(lambda p: render_shapes(p, resolution), (params,), (d,))
        cols.append(_flat(dx))
    return orthonormal_basis(torch.stack(cols, dim=2), rtol)            # [N, P, k]


# Augmentation directions at the identity for `augment_tangent_basis`: (transform, make_params values).
AUGMENT_DIRECTIONS: tuple[tuple[str, dict], ...] = (
    ("translate_x", {"translate": (1.0, 0.0)}), ("translate_y", {"translate": (0.0, 1.0)}),
    ("rotate", {"rotate": 1.0}), ("scale", {"scale": 1.0}),
    ("aniso_0", {"aniso": 1.0, "aniso_angle": 0.0}), ("aniso_45", {"aniso": 1.0, "aniso_angle": math.pi / 4}),
    ("brightness", {"brightness": 1.0}), ("contrast", {"contrast": 1.0}),
    ("hue", {"hue": 1.0}), ("saturation", {"saturation": 1.0}),
)


def augment_tangent_basis(x: Tensor, directions: Sequence[str] = tuple(d for d, _ in AUGMENT_DIRECTIONS),
                          h: float = 1e-3, rtol: float = 1e-3) -> Tensor:
    """Estimated tangent spaces for real images: derivatives of the augmentation transforms at the
    identity, orthonormalised. x: [N, C, H, W] (C = 1 or 3); returns [N, C*H*W, k].

    Each direction is a one-parameter family of `ayt.augment` transforms (translation along x / y,
    rotation, isotropic and anisotropic scaling, brightness, contrast, hue, saturation: the
    symmetries the feature net is trained on, docs/method.md section 3.3), differentiated by central
    differences (T(h) - T(-h)) / 2h; both sides go through the same warp filter.
    """
    from .augment import AugmentPipe
    table = dict(AUGMENT_DIRECTIONS)
    unknown = [d for d in directions if d not in table]
    if unknown or not directions:
        raise ValueError(f"unknown augmentation direction(s) {unknown}; expected names from {list(table)}")
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(x.shape)}")
    pipe = AugmentPipe("geo_clr", p=1.0)
    n = x.shape[0]
    cols = []
    with torch.no_grad():
        for d in directions:
            vals = table[d]

            def at(s: float) -> Tensor:
                kw = {k: (tuple(s * e for e in v) if isinstance(v, tuple) else (v if k == "aniso_angle" else s * v))
                      for k, v in vals.items()}
                return pipe.apply(x, pipe.make_params(n, device=x.device, **kw))[0]
            cols.append(_flat((at(h) - at(-h)) / (2 * h)))
    return orthonormal_basis(torch.stack(cols, dim=2), rtol)


def local_pca_basis(x: Tensor, data: Tensor, k_neighbors: int = 32, dim: int = 8, chunk: int = 256) -> Tensor:
    """Estimated tangent spaces by local PCA: for each x, the top `dim` principal directions of its
    k nearest training neighbours (Euclidean, centred at their mean). Returns [N, P, dim].

    x: [N, ...], data: [M, ...], both flattening to P entries; needs dim < k_neighbors <= M. A point of
    `data` passed as x is its own nearest neighbour (distance 0), as for any other neighbour.
    """
    xf, df = _flat(x).float(), _flat(data).to(x.device).float()
    if xf.shape[1] != df.shape[1]:
        raise ValueError(f"x has {xf.shape[1]} entries per sample, data {df.shape[1]}")
    if not 0 < dim < k_neighbors <= df.shape[0]:
        raise ValueError(f"need 0 < dim < k_neighbors <= len(data); got dim={dim}, k_neighbors={k_neighbors}, "
                         f"len(data)={df.shape[0]}")
    out = []
    for i in range(0, xf.shape[0], chunk):
        idx = torch.cdist(xf[i:i + chunk], df).topk(k_neighbors, dim=1, largest=False).indices   # [n, k]
        nb = df[idx].double()                                                                # [n, k, P]
        nb = nb - nb.mean(dim=1, keepdim=True)
        _, _, Vh = torch.linalg.svd(nb, full_matrices=False)                                 # Vh [n, k', P]
        out.append(Vh[:, :dim].transpose(1, 2).float())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Oscillation across checkpoints

def update_cosines(outputs: Tensor) -> Tensor:
    """Cosines between successive updates of the same outputs: outputs [K, N, ...] (f_k(x) for K
    successive checkpoints) -> [K - 2, N], entry k = cos(f_{k+2} - f_{k+1}, f_{k+1} - f_k).

    +1: the output keeps moving the same way (drift); 0: a random walk; -1: it reverses (oscillation).
    Reference value: -1/2 in expectation when f_k(x) fluctuates independently around a fixed point
    (u_k = n_{k+1} - n_k with i.i.d. isotropic n_k). Zero updates give 0.
    """
    if outputs.ndim < 3 or outputs.shape[0] < 3:
        raise ValueError(f"need outputs [K >= 3, N, ...], got {tuple(outputs.shape)}")
    u = outputs[1:] - outputs[:-1]                                       # [K-1, N, ...]
    return torch.stack([cosine(u[k + 1], u[k]) for k in range(u.shape[0] - 1)])


def _checkpoint_list(run_dir: Union[str, Path], checkpoints: Optional[Sequence] = None,
                     which: str = "model") -> list[tuple[int, Path]]:
    """(iteration, path) pairs: every checkpoint of the run holding the `which` weights (EMA: snapshots
    too, see `ayt.checkpoint.list_weights`), or the given iterations / paths."""
    available = ck.list_weights(run_dir, which)
    if not available:
        raise ck.CheckpointError(f"run directory {run_dir} holds no checkpoints" + (
            " with raw weights (which='model' needs full checkpoints: train with keep_last=0 to keep them all, "
            "or use which='ema', which also reads the EMA-only snapshots)" if which == "model" else ""))
    if checkpoints is None:
        return available
    by_it = dict(available)
    out = []
    for c in checkpoints:
        if isinstance(c, (str, Path)):
            p = Path(c)
            out.append((int(ck.load_checkpoint(p)["iteration"]), p))
        elif int(c) in by_it:
            out.append((int(c), by_it[int(c)]))
        else:
            raise ValueError(f"{run_dir} has no checkpoint at iteration {c} with the {which!r} weights; it has "
                             f"{sorted(by_it)}" + (" (only the last keep_last full checkpoints are kept; the EMA "
                                                   "snapshots serve which='ema')" if which == "model" else ""))
    return out


class _NetLoader:
    """Builds the run's network once and loads the weights of each checkpoint into it (eval mode)."""

    def __init__(self, which: str = "model", device: Union[str, torch.device] = "cpu"):
        if which not in ("model", "ema"):
            raise ValueError(f"which must be 'model' (raw weights) or 'ema', got {which!r}")
        self.which, self.device, self.net, self.key = which, torch.device(device), None, None

    def __call__(self, path: Path) -> tuple[torch.nn.Module, dict]:
        _, state = ck.load_run_checkpoint(path, self.which)
        cfg = from_dict(state["config"])
        if cfg.stage == "feature":
            raise ValueError(f"{path} is a feature-network checkpoint, not a denoiser")
        key = (cfg.net.arch, cfg.net.dropout, cfg.data.resolution, state["img_channels"], state["label_dim"])
        if self.net is None or key != self.key:
            self.net = build_diffusion_net(cfg, state["img_channels"], state["label_dim"]).to(self.device)
            self.key = key
        ck.load_state_dict_strict(self.net, state[self.which], f"checkpoint {path} ({self.which})")
        return self.net.eval(), state


@torch.no_grad()
def checkpoint_outputs(run_dir: Union[str, Path], x_0: Tensor, eps: Tensor, t: TimeLike,
                       checkpoints: Optional[Sequence] = None, which: str = "model",
                       class_labels: Optional[Tensor] = None) -> tuple[list[int], Tensor]:
    """(iterations [K], outputs [K, N, C, H, W]): f_k(x_0 + t eps, t) for successive checkpoints k."""
    _check_pair(x_0, eps)
    load = _NetLoader(which, x_0.device)
    its, outs = [], []
    tv = _noise_levels(t, x_0.shape[0], x_0)
    for it, path in _checkpoint_list(run_dir, checkpoints, which):
        net, _ = load(path)
        outs.append(net(x_0 + _per_sample(tv, x_0) * eps, tv, class_labels))
        its.append(it)
    return its, torch.stack(outs)


def oscillation(run_dir: Union[str, Path], x_0: Tensor, eps: Tensor, t: TimeLike,
                checkpoints: Optional[Sequence] = None, which: str = "model",
                class_labels: Optional[Tensor] = None) -> dict:
    """Oscillation of the outputs f_k(x_t, t) over a run's successive checkpoints.

    Uses the raw weights ('model') by default, since the question is about optimisation steps (the
    EMA averages them away); which='ema' for the evaluated network. The update between two
    checkpoints sums every optimiser step in between, so checkpoints should be dense (the disk
    presets save every 50 iterations). x_0, eps: [N, C, H, W]; t: float or [N].
    Returns {'iterations': [K] ints, 'outputs': [K, N, C, H, W], 'updates': [K-1, N, C, H, W]
    (f_{k+1} - f_k), 'cosine': [K-2, N] (`update_cosines`)}.
    """
    its, outs = checkpoint_outputs(run_dir, x_0, eps, t, checkpoints, which, class_labels)
    if len(its) < 3:
        raise ValueError(f"oscillation needs at least 3 checkpoints, {run_dir} gives {len(its)}")
    return {"iterations": its, "outputs": outs, "updates": outs[1:] - outs[:-1], "cosine": update_cosines(outs)}


# ----------------------------------------------------------------------------------------------
# Studies: decomposition and oscillation over runs, checkpoints and noise levels

DEFAULT_TS: tuple[float, ...] = (0.01, 0.1, 0.5, 1, 2, 3, 4, 5, 10, 40, 80)   # the paper's tangent figure


def _mean(v: Tensor) -> float:
    return float(v.double().mean())


def _run_configs(run_dirs: dict[str, Union[str, Path]], data_name: str) -> dict:
    """{label: TrainConfig} of consistency runs on one data set (same data settings), else ValueError."""
    if not run_dirs:
        raise ValueError("the study needs at least one run directory")
    cfgs = {}
    for name, rd in run_dirs.items():
        cfg = from_dict(ck.load_checkpoint(_checkpoint_list(rd, which="ema")[0][1])["config"])
        if cfg.data.name != data_name or cfg.stage != "consistency":
            raise ValueError(f"{rd}: expected a consistency run on data.name={data_name!r}, "
                             f"got stage={cfg.stage!r}, data.name={cfg.data.name!r}")
        cfgs[name] = cfg
    first = next(iter(cfgs.values()))
    for name, cfg in cfgs.items():
        if cfg.data != first.data:
            raise ValueError(f"run {name!r} uses other data settings than the first run ({cfg.data} vs {first.data})")
    return cfgs


def _study_distance(cfgs: dict, feature_net: Optional[Union[str, Path]], resolution: int, channels: int,
                    device: torch.device) -> tuple[Callable, str]:
    """The MFD of `feature_net` (default: the ct.feature_net of the first run that names one)."""
    with_net = [c.ct for c in cfgs.values() if c.ct.feature_net]
    if feature_net is None:
        if not with_net:
            raise ValueError("no run names a feature net (ct.feature_net): pass feature_net=<feature run dir>")
        feature_net = with_net[0].feature_net
    ct = with_net[0] if with_net else next(iter(cfgs.values())).ct
    phi = load_feature_net(str(feature_net), ct.feature_arch, resolution, channels, ct.feature_outputs)
    return MFD(phi.to(device), eps=ct.mfd_eps), str(feature_net)


def tangent_study(run_dirs: dict[str, Union[str, Path]], x_0: Tensor, eps: Tensor, ts: Sequence[float],
                  basis: Tensor, distance: Callable[[Tensor, Tensor], Tensor],
                  project_fn: Optional[Callable[[Tensor], Tensor]] = None,
                  distance_to_manifold: Optional[Callable[[Tensor], Tensor]] = None,
                  checkpoints: Optional[Sequence] = None, which: str = "model",
                  log: Optional[Callable[[str], None]] = None) -> dict:
    """Decomposition and oscillation of consistency updates for fixed trajectories x_0 + t eps.

    run_dirs: {label: consistency run directory}. x_0, eps: [N, C, H, W]; basis: the tangent space,
    [P, k] or [N, P, k] (see `decompose`); distance: the frozen distance of the AYT direction (MFD).
    For every run, checkpoint k (raw weights by default, see `oscillation`) and noise level t, with r
    from the run's ECT schedule at that iteration, the per-t record holds lists over checkpoints of
    sample means:
      cm / ayt / jvp : tangent_fraction, normal_fraction (and toward_cosine at D_t when project_fn is
                       given) of the ECT direction u_cm, the AYT direction u_ayt and -T_c (the continuous
                       CM tangent with the sign of the update it asks for);
      cm_ayt_cosine  : cos(u_cm, u_ayt); output_distance: distance_to_manifold(D_t) when given;
      oscillation    : over successive checkpoints, `update_cosines` of D_t ('cosine', at the middle
                       checkpoint's iteration) and, per realised update f_{k+1} - f_k, its tangent
                       fraction, toward-manifold cosine (with project_fn) and norm.
    The `summary` of each run averages the last checkpoint over ts, and the oscillation measures over
    the last half of the run. Returns a JSON-serialisable dict (floats and lists).
    """
    _check_pair(x_0, eps)
    log = log or (lambda s: None)
    n, dim = x_0.shape[0], x_0[0].numel()
    keys = [f"{t:g}" for t in ts]
    result: dict = {"ts": [float(t) for t in ts], "n": n, "which": which, "runs": {}}
    for name, rd in run_dirs.items():
        load = _NetLoader(which, x_0.device)
        ckpts = _checkpoint_list(rd, checkpoints, which)
        cfg = from_dict(ck.load_checkpoint(ckpts[0][1])["config"])
        schedule = C.TRSchedule.from_config(cfg.ct)
        measures = ["tangent_fraction", "normal_fraction"] + (["toward_cosine"] if project_fn else [])
        per_t = {k: {**{d: {m: [] for m in measures} for d in ("cm", "ayt", "jvp")}, "cm_ayt_cosine": []}
                 for k in keys}
        if distance_to_manifold is not None:
            for k in keys:
                per_t[k]["output_distance"] = []
        outputs: dict[str, list[Tensor]] = {k: [] for k in keys}
        bar = Progress(len(ckpts), f"[tangent-study {name}]", "ckpt")  # rate and ETA over the checkpoints
        for it, path in ckpts:
            net, _ = load(path)
            stage = C.stage_at(schedule, it)
            for t_val, key in zip(ts, keys):
                t = _noise_levels(float(t_val), n, x_0)
                r = C.t_to_r(t, stage, schedule.q, schedule.k, schedule.b, schedule.mapping, schedule.const_floor)
                w = C.ect_weight(t, r, cfg.ct.weighting)
                D_t, D_r = consistency_pair(net, x_0, eps, t, r)
                u = {"cm": cm_update_direction(D_t, D_r, w, cfg.ct.c_mult * math.sqrt(dim)),
                     "ayt": ayt_tangent(distance, D_t, D_r, w),
                     "jvp": -continuous_tangent(net, x_0, eps, t)}
                rec = per_t[key]
                for d, v in u.items():
                    tf, nf = decompose(v, basis)
                    rec[d]["tangent_fraction"].append(_mean(tf))
                    rec[d]["normal_fraction"].append(_mean(nf))
                    if project_fn is not None:
                        rec[d]["toward_cosine"].append(_mean(toward_manifold_cosine(v, D_t, project_fn)))
                rec["cm_ayt_cosine"].append(_mean(cosine(u["cm"], u["ayt"])))
                if distance_to_manifold is not None:
                    rec["output_distance"].append(_mean(distance_to_manifold(D_t)))
                outputs[key].append(D_t)
            log(f"[tangent-study] {name}: iteration {it} done")
            bar.update()
        bar.close()
        its = [it for it, _ in ckpts]
        for key, outs in outputs.items():
            if len(outs) < 3:
                continue
            outs_t = torch.stack(outs)                                      # [K, N, C, H, W]
            upd = outs_t[1:] - outs_t[:-1]
            osc = {"iterations": its[1:-1], "cosine": [_mean(c) for c in update_cosines(outs_t)],
                   "update_iterations": its[1:],
                   "update_tangent_fraction": [_mean(decompose(u_k, basis)[0]) for u_k in upd],
                   "update_norm": [_mean(_flat(u_k).norm(dim=1)) for u_k in upd]}
            if project_fn is not None:
                osc["update_toward_cosine"] = [_mean(toward_manifold_cosine(u_k, o, project_fn))
                                               for u_k, o in zip(upd, outs_t[:-1])]
            per_t[key]["oscillation"] = osc

        def last_half(values: list[float]) -> float:
            tail = values[len(values) // 2:]
            return sum(tail) / len(tail)

        summary = {f"{d}_{m}": sum(per_t[k][d][m][-1] for k in keys) / len(keys)
                   for d in ("cm", "ayt", "jvp") for m in measures}
        summary["cm_ayt_cosine"] = sum(per_t[k]["cm_ayt_cosine"][-1] for k in keys) / len(keys)
        if distance_to_manifold is not None:
            summary["output_distance"] = sum(per_t[k]["output_distance"][-1] for k in keys) / len(keys)
        oscs = [per_t[k]["oscillation"] for k in keys if "oscillation" in per_t[k]]
        for m in ("cosine", "update_tangent_fraction", "update_toward_cosine"):
            if oscs and m in oscs[0]:
                summary[f"oscillation_{m}_last_half"] = sum(last_half(o[m]) for o in oscs) / len(oscs)
        result["runs"][name] = {"run_dir": str(rd), "mode": cfg.ct.mode, "iterations": its, "per_t": per_t,
                                "summary": summary}
    return result


def disk_study(run_dirs: dict[str, Union[str, Path]], ts: Sequence[float] = DEFAULT_TS, n: int = 512,
               seed: int = 0, feature_net: Optional[Union[str, Path]] = None,
               checkpoints: Optional[Sequence] = None, which: str = "model",
               device: Union[str, torch.device] = "cpu", log: Optional[Callable[[str], None]] = None) -> dict:
    """`tangent_study` on the 2-D disk in R^D, whose manifold is known exactly.

    run_dirs: {label: consistency run on data.name='disk'} (e.g. the presets disk-ect, disk-ayt), all
    on the same disk. x_0: n training points (a seeded subset), eps: one seeded draw; tangent space:
    the disk's plane (`DiskData.basis`, [D, 2]); toward-manifold cosines with `DiskData.project`;
    output_distance: `DiskData.distance_to_manifold`. AYT directions use the MFD of `feature_net`
    (default: the runs' ct.feature_net), for every run (also ECT's). A random direction has tangent
    fraction 2/D in expectation.
    """
    device = torch.device(device)
    cfgs = _run_configs(run_dirs, "disk")
    ds = build_dataset(next(iter(cfgs.values())))
    disk = ds.data
    distance, feature_net = _study_distance(cfgs, feature_net, 1, disk.dim, device)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(ds), generator=g)[:n]
    x_0 = disk.points[idx].reshape(-1, disk.dim, 1, 1).to(device)     # [n, D, 1, 1]
    eps = torch.randn(x_0.shape, generator=g).to(device)
    res = tangent_study(run_dirs, x_0, eps, ts, disk.basis.to(device), distance, project_fn=disk.project,
                        distance_to_manifold=lambda x: disk.distance_to_manifold(x.cpu()),
                        checkpoints=checkpoints, which=which, log=log)
    return {"study": "disk", "dim": disk.dim, "manifold_dim": 2, "seed": seed, "feature_net": feature_net, **res}


def shapes_study(run_dirs: dict[str, Union[str, Path]], ts: Sequence[float] = DEFAULT_TS, n: int = 64,
                 seed: int = 0, feature_net: Optional[Union[str, Path]] = None,
                 checkpoints: Optional[Sequence] = None, which: str = "model",
                 device: Union[str, torch.device] = "cpu", log: Optional[Callable[[str], None]] = None) -> dict:
    """`tangent_study` on the built-in shapes: the tangent space at each trajectory's clean image x_0,
    exact from its generating parameters (`shapes_tangent_basis`, at most 10 of 3*R*R dimensions).

    run_dirs: {label: consistency run on data.name='shapes'} (e.g. mini-ect, mini-ayt). x_0: n training
    images (a seeded subset), eps: one seeded draw. No projection onto the (non-linear) shapes manifold
    is computed, so there are no toward-manifold cosines; the basis is that at x_0, which is the
    tangent space at the output only where f(x_t, t) is close to x_0 (small t).
    """
    device = torch.device(device)
    cfgs = _run_configs(run_dirs, "shapes")
    ds = build_dataset(next(iter(cfgs.values())))
    res_px = ds.resolution
    distance, feature_net = _study_distance(cfgs, feature_net, res_px, 3, device)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(ds), generator=g)[:n]
    params = ds.params[idx].double()
    x_0 = ds.images[idx].to(device)
    eps = torch.randn(x_0.shape, generator=g).to(device)
    basis = shapes_tangent_basis(params, res_px).float().to(device)    # [n, 3 R R, k]
    res = tangent_study(run_dirs, x_0, eps, ts, basis, distance, checkpoints=checkpoints, which=which, log=log)
    return {"study": "shapes", "dim": x_0[0].numel(), "manifold_dim": int(basis.shape[2]), "seed": seed,
            "feature_net": feature_net, **res}


# ----------------------------------------------------------------------------------------------
# Command line

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ayt.analysis", description="tangent analysis (ayt.analysis)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, what, n in (("disk-study", "the 2-D disk (presets disk-ect, disk-ayt)", 512),
                         ("shapes-study", "the built-in shapes (presets mini-ect, mini-ayt)", 64)):
        d = sub.add_parser(cmd, help=f"tangent/normal decomposition and oscillation on {what}")
        d.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR",
                       help="a consistency run (repeat: --run ect=... --run ayt=...)")
        d.add_argument("--out", required=True, help="output directory for results.json and figures/")
        d.add_argument("--ts", default=",".join(f"{t:g}" for t in DEFAULT_TS), help="comma-separated noise levels")
        d.add_argument("--n", type=int, default=n, help="trajectories (training points x_0)")
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--feature-net", default=None, help="feature run dir (default: from the runs' configs)")
        d.add_argument("--which", default="model", choices=("model", "ema"), help="raw weights or EMA")
        d.add_argument("--device", default="cpu")
        d.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    runs = {}
    for item in args.run:
        if "=" not in item:
            p.error(f"--run {item!r} is not LABEL=RUN_DIR")
        k, v = item.split("=", 1)
        runs[k] = v
    study = disk_study if args.cmd == "disk-study" else shapes_study
    res = study(runs, [float(t) for t in args.ts.split(",")], n=args.n, seed=args.seed,
                feature_net=args.feature_net, which=args.which, device=args.device, log=print)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ck.write_json_atomic(res, out / "results.json")
    for name, r in res["runs"].items():
        print(f"[{args.cmd}] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["summary"].items()))
    if not args.no_figures:
        from . import plotting
        for path in plotting.plot_tangent_study(res, out / "figures"):
            print(f"[{args.cmd}] wrote {path}")
    print(f"[{args.cmd}] wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
