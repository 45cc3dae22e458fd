"""Continuous-time consistency models: distillation from a diffusion teacher (CCD) and training
without one (CT), each in pixel space or in a feature network's space (the AYT form); docs/method.md
section 4.3.

Notation (as in ayt.consistency): x_0 data [N, C, H, W], eps ~ N(0, I), t ~ lognormal(P_mean, P_std)
[N], x_t = x_0 + t eps, f(x, t) the student (EDMPrecond), phi the frozen feature network.

One iteration (the authors' `scripts/train_cm/train_ccd.py` / `train_ccd_ayt.py` of 1202kbs/AYT):

    v  = (x_t - D_T(x_t, t)) / t                          CCD: PF-ODE velocity of the frozen teacher D_T
       = eps                                              CT:  single-sample estimate (x_t - x_0) / t
    T  = d/ds g(x_t + s v, t + s) at s = 0                JVP along (v, 1), no graph, student dropout
                                                          mask shared with the forward below
         g = f                     -> T [N, C, H, W]      (ccd, cct)
         g = flat(phi.features(f)) -> T [N, F]            (ccd-ayt, cct-ayt: every stage flattened, concatenated)
    T <- T / (||T|| sqrt(1 / dim) + c)                    tangent normalisation, c = 0.1 (`normalize_tangent`)
    Y  = g(x_t, t) with graph
    L  = mean_b (1/t_b) <Y_b, T_b>                        T a constant (`continuous_loss`)

A gradient step on L moves each output against its (normalised) tangent: the continuous-time limit
of the consistency loss (Song et al. 2023, Lu & Song 2024 "sCM"). In the feature-space form the
step is d L / d f = J_phi^T T: the tangent is measured, and aligned, in phi's space (AYT).

The authors' feature-space script multiplies a [N, 1, 1, 1] weight by [N, F] tensors; the product
broadcasts to [N, 1, N, F], so the loss they optimise is mean_i (1/t_i) * mean_{j,f} Y_jf T_jf:
every sample weighted by the batch mean of 1/t and the value divided by F. `weighting="batch-mean"`
reproduces it; the default "per-sample" is the loss as written (and as their pixel script computes it).

Stabilisers of continuous-time consistency models (Lu & Song 2024, section 4), all named settings:
tangent normalisation (on by default, the authors' RMS form; sCM's is `norm="l2"`), tangent warm-up
(off by default; sCM: 10,000 iterations) and adaptive weighting (off by default; sCM: on).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import checkpoint as ck
from . import consistency as C
from .config import from_dict
from .networks import load_edm_checkpoint, load_into
from .runs import EDM_PRETRAINED, build_diffusion_net, load_feature_net, read_ayt_checkpoint, resolve_pretrained

CONTINUOUS_MODES = ("ccd", "ccd-ayt", "cct", "cct-ayt")
TEACHER_MODES = ("ccd", "ccd-ayt")
FEATURE_MODES = ("ccd-ayt", "cct-ayt")
JVP_IMPLS = ("auto", "func", "double-backward")
TANGENT_NORMS = ("rms", "l2", "none")
LOSS_WEIGHTINGS = ("per-sample", "batch-mean")


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """[N] -> [N, 1, ..., 1] broadcasting against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------
# Velocities

@torch.no_grad()
def teacher_velocity(denoiser: Callable, x_t: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
    """PF-ODE velocity dx/dt = (x_t - D_T(x_t, t)) / t of a diffusion denoiser, [N, C, H, W] (no graph).
    x_t [N, C, H, W], t [N] > 0; the denoiser runs as given (the caller keeps it in eval mode)."""
    return (x_t - denoiser(x_t, t, class_labels).float()) / _per_sample(t, x_t)


# ----------------------------------------------------------------------------------------------
# Jacobian-vector products

def _rng_devices(x: Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


def jvp_func(fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(fn(*primals), J fn . tangents) by forward-mode autodiff (torch.func.jvp), both without graph."""
    with torch.no_grad():
        out, jvp = torch.func.jvp(fn, tuple(primals), tuple(tangents))
    return out.detach(), jvp.detach()


def jvp_double_backward(fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The same product by reverse mode twice: with u a dummy cotangent, J^T u = grad(out, x; u) is linear
    in u, so J v = grad(<J^T u, v>, u). For operators without forward-mode formulas; two backward passes."""
    with torch.enable_grad():
        xs = [p.detach().requires_grad_(True) for p in primals]
        out = fn(*xs)
        u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, xs, u, create_graph=True, allow_unused=True)
        dot = sum((g * v).sum() for g, v in zip(grads, tangents) if g is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:   # the output does not depend on the inputs
            return out.detach(), torch.zeros_like(out)
        (jvp,) = torch.autograd.grad(dot, u)
    return out.detach(), jvp.detach()


class JVP:
    """Jacobian-vector products by `impl`: "func" (torch.func.jvp), "double-backward", or "auto" (func,
    falling back to double backward for good, with a warning, the first time forward mode fails).

    `__call__(fn, primals, tangents)` runs fn with the global RNG (CPU, and the CUDA device of the first
    primal) as it was on entry, and restores it on exit, so dropout in fn draws the mask that a later
    call of fn from the same state draws (also when "auto" retries). Returns (out, jvp), no graph.
    """

    def __init__(self, impl: str = "auto"):
        if impl not in JVP_IMPLS:
            raise ValueError(f"unknown jvp implementation {impl!r}; expected one of {JVP_IMPLS}")
        self.impl = impl

    def __call__(self, fn: Callable, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        devices = _rng_devices(primals[0])
        with torch.random.fork_rng(devices=devices):
            if self.impl == "double-backward":
                return jvp_double_backward(fn, primals, tangents)
            if self.impl == "func":
                return jvp_func(fn, primals, tangents)
            cpu = torch.get_rng_state()
            cuda = [torch.cuda.get_rng_state(d) for d in devices]
            try:
                return jvp_func(fn, primals, tangents)
            except (RuntimeError, NotImplementedError) as e:
                warnings.warn(f"torch.func.jvp failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "computing tangents by double backward from now on (continuous.jvp=double-backward)")
                self.impl = "double-backward"
                torch.set_rng_state(cpu)
                for d, s in zip(devices, cuda):
                    torch.cuda.set_rng_state(s, d)
                return jvp_double_backward(fn, primals, tangents)


# ----------------------------------------------------------------------------------------------
# Tangents

def flatten_features(feats: Sequence[Tensor]) -> Tensor:
    """Every feature map flattened per sample and concatenated: list of [N, ...] -> [N, F]."""
    return torch.cat([f.flatten(1) for f in feats], dim=1)


def output_tangent(net: Callable, x_t: Tensor, t: Tensor, v: Tensor, class_labels: Optional[Tensor] = None,
                   jvp: Optional[JVP] = None) -> tuple[Tensor, Tensor]:
    """(f(x_t, t), T = d/ds f(x_t + s v, t + s) at s = 0), each [N, C, H, W], without graph.
    The RNG is restored on return (see `JVP`), so a following forward of f shares the dropout mask."""
    jvp = jvp or JVP()
    return jvp(lambda x, s: net(x, s, class_labels), (x_t, t), (v, torch.ones_like(t)))


def feature_tangent(phi: nn.Module, D: Tensor, T: Tensor, jvp: Optional[JVP] = None) -> tuple[Tensor, Tensor]:
    """(flat(phi.features(D)), J T) [N, F] each: the pixel tangent T pushed through the frozen phi.
    By the chain rule this is the JVP of flat(phi.features(f(.))) along (v, 1) (the CCD-AYT tangent)."""
    jvp = jvp or JVP()
    return jvp(lambda d: flatten_features(phi.features(d)), (D,), (T,))


def edm_tangent_without_network(D: Tensor, x_t: Tensor, t: Tensor, v: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The tangent of f = c_skip(t) x + c_out(t) F with F held fixed: c_skip' x_t + c_skip v + c_out' F,
    F = (D - c_skip x_t) / c_out (EDM coefficients, ayt.networks.edm_precond_coefficients):
    c_skip' = -2 t sd^2 / (t^2 + sd^2)^2, c_out' = sd^3 / (t^2 + sd^2)^(3/2). The full tangent is this
    plus c_out dF/dt; the tangent warm-up of sCM ramps that network-derivative term from 0 to 1.
    D, x_t, v [N, C, H, W]; t [N]."""
    t4 = _per_sample(t, x_t)
    s2 = t4 ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / s2
    c_out = t4 * sigma_data / s2.sqrt()
    F = (D - c_skip * x_t) / c_out
    return -2 * t4 * sigma_data ** 2 / s2 ** 2 * x_t + c_skip * v + sigma_data ** 3 / s2 ** 1.5 * F


def tangent_warmup(it: int, warmup_iters: int) -> float:
    """sCM's tangent warm-up factor: min(1, (it + 1) / warmup_iters), 1 when warmup_iters is 0."""
    return min(1.0, (it + 1) / warmup_iters) if warmup_iters > 0 else 1.0


def tangent_rms(T: Tensor) -> Tensor:
    """Per-sample RMS ||T_b|| / sqrt(dim) [N]."""
    return T.flatten(1).norm(dim=1) / math.sqrt(T[0].numel())


def normalize_tangent(T: Tensor, c: float = 0.1, norm: str = "rms") -> Tensor:
    """Per-sample tangent normalisation.

    "rms" (the authors' CCD scripts): T / (||T|| sqrt(numel(||T||) / numel(T)) + c) = T / (||T|| / sqrt(dim) + c);
    "l2" (sCM): T / (||T|| + c); "none": T. Norms over all non-batch dims; T [N, ...].
    """
    if norm == "none":
        return T
    n = T.flatten(1).norm(dim=1)                                       # [N]
    if norm == "rms":
        n = n * math.sqrt(T.shape[0] / T.numel())
    elif norm != "l2":
        raise ValueError(f"unknown tangent normalisation {norm!r}; expected one of {TANGENT_NORMS}")
    return T / _per_sample(n + c, T)


# ----------------------------------------------------------------------------------------------
# Loss

def continuous_loss(Y: Tensor, T: Tensor, t: Tensor, weighting: str = "per-sample") -> Tensor:
    """Per-sample loss [N] whose batch mean is the training loss; Y (with graph) and T (constant) [N, ...].

    "per-sample":  l_b = (1/t_b) <Y_b, T_b>              mean_b l_b = mean_b (1/t_b) <Y_b, T_b>
    "batch-mean":  l_b = mean_i(1/t_i) mean_f Y_bf T_bf   mean_b l_b = the authors' train_ccd_ayt.py value
    """
    T = T.detach()
    if weighting == "per-sample":    # weight first, as the authors' (w * Y * T).sum(...) (same rounding)
        return (_per_sample(1 / t, Y) * Y * T).flatten(1).sum(1)
    if weighting == "batch-mean":
        return (1 / t).mean().detach() * (Y * T).flatten(1).mean(1)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")


class AdaptiveWeight(nn.Module):
    """sCM's learned loss weighting w_phi(t) (Lu & Song 2024, eq. 8): a linear layer on a Fourier
    embedding of c_noise = ln(t)/4, initialised to w = 0. With it the per-sample loss becomes

        l_b = e^{w(t_b)} / dim * ||Y_b - sg(Y_b - G_b)||^2 - w(t_b),   G_b = the plain loss's gradient (1/t_b) T_b

    (value e^w ||G||^2 / dim - w, minimised over w at e^w = dim / ||G||^2: the weighting learns to undo
    the variance of the loss across t). t [N] -> w [N].
    """

    def __init__(self, channels: int = 128, scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(channels // 2, generator=g) * scale)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        x = torch.outer(t.float().log() / 4, 2 * math.pi * self.freqs)
        return self.linear(torch.cat([x.cos(), x.sin()], dim=1) * math.sqrt(2)).squeeze(1)


def adaptive_loss(Y: Tensor, G: Tensor, w: Tensor) -> Tensor:
    """l_b = e^{w_b} / dim * ||Y_b - sg(Y_b - G_b)||^2 - w_b [N]; gradient w.r.t. Y_b is 2 e^{w_b} / dim * G_b."""
    dim = Y[0].numel()
    target = (Y - G).detach()
    return w.exp() / dim * (Y - target).flatten(1).square().sum(1) - w


# ----------------------------------------------------------------------------------------------
# One step, and the objective of the training loop

def continuous_step(net: Callable, student: Callable, x_0: Tensor, eps: Tensor, t: Tensor, v: Tensor,
                    class_labels: Optional[Tensor] = None, phi: Optional[nn.Module] = None,
                    jvp: Optional[JVP] = None, tangent_norm: str = "rms", tangent_c: float = 0.1,
                    warmup: float = 1.0, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(Y with graph, normalised tangent T, raw tangent RMS [N]) for one batch.

    net: the student as the loop runs it (maybe a DDP wrapper), for the forward with graph; student: the
    bare module, for the JVP (no graph). The JVP runs from the current RNG state and restores it, so the
    forward with graph draws the same dropout mask. phi: None (pixel space, Y = f [N, C, H, W]) or the
    frozen feature net (Y = flat(phi.features(f)) [N, F]). warmup < 1 mixes the tangent of f with F held
    fixed (`edm_tangent_without_network`) into the pixel tangent before phi and the normalisation.
    x_0, eps, v [N, C, H, W]; t [N].
    """
    jvp = jvp or JVP()
    x_t = x_0 + _per_sample(t, x_0) * eps
    D_jvp, T = output_tangent(student, x_t, t, v, class_labels, jvp)
    if warmup < 1.0:
        T0 = edm_tangent_without_network(D_jvp, x_t, t, v, sigma_data)
        T = T0 + warmup * (T - T0)
    if phi is not None:
        _, T = feature_tangent(phi, D_jvp, T, jvp)
    rms = tangent_rms(T)
    T = normalize_tangent(T, tangent_c, tangent_norm)
    D = net(x_t, t, class_labels)
    Y = D if phi is None else flatten_features(phi.features(D))
    return Y, T, rms


class ContinuousObjective:
    """CCD / CCD-AYT / CT / CT-AYT for the one training loop (`objective(net, x_0, labels, it, generator,
    teacher) -> (per-sample loss [N], stats)`; `teacher` is the loop's bare student module).

    denoiser: the frozen diffusion teacher (CCD modes) or None (CT: v = eps). phi: the frozen feature
    network (the -ayt modes). `module` holds the trainable parts of the objective (the adaptive weight)
    or is None; the loop optimises and checkpoints it with the model.
    """

    def __init__(self, mode: str, P_mean: float = -1.1, P_std: float = 2.0, denoiser: Optional[nn.Module] = None,
                 phi: Optional[nn.Module] = None, tangent_norm: str = "rms", tangent_c: float = 0.1,
                 weighting: str = "per-sample", jvp: str = "auto", warmup_iters: int = 0,
                 adaptive: Optional[AdaptiveWeight] = None):
        if mode not in CONTINUOUS_MODES:
            raise ValueError(f"unknown continuous mode {mode!r}; expected one of {CONTINUOUS_MODES}")
        if (mode in TEACHER_MODES) != (denoiser is not None):
            raise ValueError(f"mode {mode!r} {'needs' if mode in TEACHER_MODES else 'takes no'} diffusion teacher")
        if (mode in FEATURE_MODES) != (phi is not None):
            raise ValueError(f"mode {mode!r} {'needs' if mode in FEATURE_MODES else 'takes no'} feature network")
        if tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"unknown tangent normalisation {tangent_norm!r}; expected one of {TANGENT_NORMS}")
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        self.mode, self.denoiser, self.phi = mode, denoiser, phi
        self.schedule = C.TRSchedule(P_mean, P_std)
        self.tangent_norm, self.tangent_c, self.weighting = tangent_norm, tangent_c, weighting
        self.jvp, self.warmup_iters, self.module = JVP(jvp), warmup_iters, adaptive

    def __call__(self, net, x_0, labels, it, generator, teacher=None):
        student = net if teacher is None else teacher
        n = x_0.shape[0]
        t, _ = C.sample_t_r(self.schedule, n, it, generator, x_0.device)           # t [N]; r unused
        eps = torch.randn(x_0.shape, generator=generator, device=x_0.device)
        if self.denoiser is not None:
            v = teacher_velocity(self.denoiser, x_0 + _per_sample(t, x_0) * eps, t, labels)
        else:
            v = eps                                                                  # (x_t - x_0) / t
        Y, T, rms = continuous_step(net, student, x_0, eps, t, v, labels, self.phi, self.jvp, self.tangent_norm,
                                    self.tangent_c, tangent_warmup(it, self.warmup_iters),
                                    float(getattr(student, "sigma_data", 0.5)))
        stats = {"tangent_rms": rms.mean()}
        if self.module is None:
            loss = continuous_loss(Y, T, t, self.weighting)
        else:
            G = T / _per_sample(t, T) if self.weighting == "per-sample" else (1 / t).mean() * T / T[0].numel()
            w = self.module(t)
            loss = adaptive_loss(Y, G, w)
            stats["adaptive_w"] = w.detach().mean()
        stats["loss"] = loss.detach().mean()
        return loss, stats


# ----------------------------------------------------------------------------------------------
# The diffusion teacher of CCD

class TeacherError(ValueError):
    """The CCD teacher is missing or does not fit the run."""


def load_teacher(path: str, cfg, img_channels: int, label_dim: int) -> nn.Module:
    """The frozen diffusion teacher D_T (eval mode, no parameter gradients) for a CCD run.

    path: a diffusion run directory or ayt checkpoint (its EMA; architecture from its config), an EDM
    .pkl or a .pt state dict (built as this run's net.arch and loaded strictly; one of EDM's released
    names is downloaded once as for net.init). Raises TeacherError (a feature or consistency run, another
    resolution, channel count or label dimension, weights that do not fit) or FileNotFoundError before
    any training.
    """
    what = f"continuous.teacher={path}"
    if not Path(path).exists() and Path(path).name not in EDM_PRETRAINED:
        raise FileNotFoundError(f"{what}: no such run directory or file. CCD distils a trained diffusion model: "
                                "give its run directory (stage=diffusion), an ayt checkpoint or an EDM .pkl")
    p = resolve_pretrained(path)
    try:
        ckpt = read_ayt_checkpoint(p) if p.is_dir() or p.suffix == ".pt" else None
    except ck.CheckpointError as e:
        raise TeacherError(f"{what}: {e}") from e
    here = f"this run has {cfg.data.resolution} px, {img_channels} channels, label_dim {label_dim}"
    if ckpt is not None:
        tcfg = from_dict(ckpt["config"])
        if tcfg.stage != "diffusion":
            raise TeacherError(f"{what} is a {tcfg.stage!r} run; CCD needs a diffusion model as teacher (its "
                               "denoiser gives the PF-ODE velocity). Give a run trained with stage=diffusion, or an EDM .pkl")
        got = (tcfg.data.resolution, ckpt.get("img_channels"), ckpt.get("label_dim"))
        if got != (cfg.data.resolution, img_channels, label_dim):
            raise TeacherError(f"{what} was trained at {got[0]} px, {got[1]} channels, label_dim {got[2]}; {here}")
        net = build_diffusion_net(tcfg, img_channels, label_dim)
        try:
            ck.load_state_dict_strict(net, ckpt["ema"], what)
        except ck.CheckpointError as e:
            raise TeacherError(str(e)) from e
    else:
        try:
            edm = load_edm_checkpoint(str(p))
        except Exception as e:
            raise TeacherError(f"{what}: cannot read it as an ayt checkpoint, an EDM .pkl or a state dict ({e})") from e
        kw = edm.init_kwargs
        got = (kw.get("img_resolution", cfg.data.resolution), kw.get("img_channels", img_channels),
               kw.get("label_dim", label_dim))
        if got != (cfg.data.resolution, img_channels, label_dim):
            raise TeacherError(f"{what} is a network for {got[0]} px, {got[1]} channels, label_dim {got[2]}; {here}")
        net = build_diffusion_net(cfg, img_channels, label_dim)
        try:
            load_into(net, edm, strict=True)
        except ValueError as e:
            raise TeacherError(f"{what} does not fit net.arch={cfg.net.arch!r} (an EDM .pkl or state dict is "
                               f"loaded into this run's architecture): {e}") from e
    net.eval().requires_grad_(False)
    return net


def build_continuous_objective(cfg, img_channels: int, label_dim: int, device: torch.device) -> ContinuousObjective:
    """The objective of a run with ct.mode in CONTINUOUS_MODES (teacher and feature net loaded and checked)."""
    ct, co = cfg.ct, cfg.continuous
    denoiser = phi = adaptive = None
    if ct.mode in TEACHER_MODES:
        denoiser = load_teacher(co.teacher or cfg.net.init, cfg, img_channels, label_dim).to(device)
    if ct.mode in FEATURE_MODES:
        phi = load_feature_net(ct.feature_net, ct.feature_arch, cfg.data.resolution, img_channels,
                               ct.feature_outputs).to(device)
    if co.adaptive_weighting:
        adaptive = AdaptiveWeight(seed=cfg.seed).to(device)
    return ContinuousObjective(ct.mode, ct.P_mean, ct.P_std, denoiser, phi, co.tangent_norm, co.tangent_c,
                               co.weighting, co.jvp, co.tangent_warmup_iters, adaptive)
