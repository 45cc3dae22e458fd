"""Easy Consistency Tuning (ECT) and consistency-model samplers.

docs/method.md sections 1, 2 and 5. Notation (Song et al. 2023; Geng et al. 2024, "ECT"):

    x_0   clean images [N, C, H, W] in [-1, 1]
    t, r  noise levels [N] with 0 <= r < t;  x_t = x_0 + t * eps,  x_r = x_0 + r * eps (one shared eps)
    f     the consistency model, f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t))  (EDMPrecond)
    D_t   f(x_t, t), the student (with graph)
    D_r   stopgrad f(x_r, r), the teacher (x_0 where r <= 0)
    w     the ECT weight 1 / (t - r)

Everything here is a pure function of its inputs; randomness comes in through explicit
`torch.Generator` arguments or explicit noise tensors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch

from .losses import pseudo_huber

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_MID = 0.821  # 2-step sampling: intermediate noise level (docs/method.md section 5.1)

R_MAPPINGS = ("sigmoid", "const")
CONST_FLOOR = 1 / 256  # the AYT code's floor on the const mapping's decay (official ECT has none)
WEIGHTINGS = ("default", "sqrt", "uniform", "snr", "karras")


# ----------------------------------------------------------------------------------------------
# t / r schedule (docs/method.md section 2, steps 1-2)

@dataclasses.dataclass(frozen=True)
class TRSchedule:
    """The ECT time-pair schedule.

    `t ~ exp(P_mean + P_std n)`; `r = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t))))` ("sigmoid") or
    `r = max(0, t (1 - max(q^-(s+1), const_floor)))` ("const"; the AYT code floors the decay at 1/256,
    official ECT's form is `const_floor=None`). The stage s is `stage` for the whole run when
    `double_every` is None (the AYT reference: q = 256, s = 0); otherwise `stage + it // double_every`
    (official ECT: q = 2, the gap t - r halves every `double_every` iterations).
    """
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 256.0
    k: float = 8.0
    b: float = 1.0
    mapping: str = "sigmoid"
    stage: int = 0
    double_every: Optional[int] = None
    const_floor: Optional[float] = CONST_FLOOR

    @classmethod
    def from_config(cls, ct) -> "TRSchedule":
        """The schedule of a run's consistency settings (`ayt.config.ConsistencyConfig`, same field names)."""
        return cls(**{f.name: getattr(ct, f.name) for f in dataclasses.fields(cls)})

    def r(self, t: torch.Tensor, it: int) -> torch.Tensor:
        """r for noise levels t (any shape) at iteration `it`."""
        return t_to_r(t, stage_at(self, it), self.q, self.k, self.b, self.mapping, self.const_floor)

    def __post_init__(self):
        if self.mapping not in R_MAPPINGS:
            raise ValueError(f"unknown r-mapping {self.mapping!r}; expected one of {R_MAPPINGS}")
        if self.q <= 1:
            raise ValueError(f"q must be > 1, got {self.q}")
        if self.P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {self.P_std}")
        if self.double_every is not None and self.double_every <= 0:
            raise ValueError(f"double_every must be a positive iteration count or None, got {self.double_every}")


def stage_at(schedule: TRSchedule, it: int) -> int:
    """Stage s at iteration `it` (0-based)."""
    if schedule.double_every is None:
        return schedule.stage
    return schedule.stage + it // schedule.double_every


def t_to_r(t: torch.Tensor, stage: int, q: float, k: float = 8.0, b: float = 1.0,
           mapping: str = "sigmoid", const_floor: Optional[float] = CONST_FLOOR) -> torch.Tensor:
    """ECT's r-mapping, elementwise on t (any shape). Returns r >= 0 with r < t.

    const: the decay is floored at `const_floor` as in the AYT code (1/256); without the floor
    (None, official ECT) q = 256 at stage 2 gives 1 - decay == 1 in float32, r == t and w = 1/(t-r)
    blows up. The sigmoid mapping has no floor in either code."""
    decay = q ** -(stage + 1)
    if mapping == "sigmoid":
        ratio = 1 - decay * (1 + k * torch.sigmoid(-b * t))
    elif mapping == "const":
        if const_floor is not None:
            decay = max(decay, const_floor)
        ratio = torch.full_like(t, 1 - decay)
    else:
        raise ValueError(f"unknown r-mapping {mapping!r}; expected one of {R_MAPPINGS}")
    return (t * ratio).clamp(min=0)


def sample_t_r(schedule: TRSchedule, n: int, it: int, generator: Optional[torch.Generator] = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (t, r), each [n], for iteration `it`. Pure function of (schedule, n, it, generator state)."""
    z = torch.randn(n, generator=generator, device=device)
    t = (schedule.P_mean + schedule.P_std * z).exp()
    return t, schedule.r(t, it)


def ect_weight(t: torch.Tensor, r: torch.Tensor, weighting: str = "default",
               sigma_data: float = 0.5) -> torch.Tensor:
    """Per-sample loss weight. "default" is ECT's and AYT's 1 / (t - r); the others are ECT's options."""
    dt = t - r
    if weighting == "default":
        return 1 / dt
    if weighting == "sqrt":
        return 1 / dt.sqrt()
    if weighting == "uniform":
        return torch.ones_like(t)
    if weighting == "snr":
        return 1 / t ** 2
    if weighting == "karras":
        return 1 / t ** 2 + 1 / sigma_data ** 2
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


# ----------------------------------------------------------------------------------------------
# The consistency step (docs/method.md section 2, steps 3-5)

@dataclasses.dataclass
class ConsistencyOutputs:
    """What one consistency forward produces; the AYT update needs D_t (with graph), D_r and w."""
    D_t: torch.Tensor  # [N, C, H, W], student output, requires grad
    D_r: torch.Tensor  # [N, C, H, W], teacher output, detached; x_0 where r <= 0
    t: torch.Tensor    # [N]
    r: torch.Tensor    # [N]
    w: torch.Tensor    # [N], loss weight


def _rng_devices(x: torch.Tensor) -> list:
    return [x.device] if x.device.type == "cuda" else []


def consistency_forward(net: Callable, x_0: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                        eps: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                        teacher: Optional[Callable] = None, weighting: str = "default") -> ConsistencyOutputs:
    """Student and teacher forwards with one shared noise draw and one shared dropout mask.

    The student runs inside `torch.random.fork_rng`, so the global RNG (CPU, and the CUDA device of
    x_0) is restored when it returns and the teacher's dropout draws the same mask. `teacher` is
    the same network without a DDP wrapper (defaults to `net`): it runs under `no_grad`.
    Shapes: x_0, eps [N, C, H, W]; t, r [N].
    """
    teacher = net if teacher is None else teacher
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    x_t = x_0 + t4 * eps
    x_r = x_0 + r4 * eps
    with torch.random.fork_rng(devices=_rng_devices(x_0)):
        D_t = net(x_t, t, class_labels)
    with torch.no_grad():  # branch-free (no host sync): the teacher always runs, x_0 replaces it where r <= 0
        D_r = teacher(x_r, r.clamp(min=SIGMA_MIN * 1e-3), class_labels)  # clamp: ln(0) never enters c_noise
        D_r = torch.where(r4 > 0, torch.nan_to_num(D_r), x_0)
    return ConsistencyOutputs(D_t=D_t, D_r=D_r.detach(), t=t, r=r, w=ect_weight(t, r, weighting))


def ect_loss(out: ConsistencyOutputs, c_mult: float = 0.0) -> torch.Tensor:
    """Per-sample ECT loss `w * d(D_t, D_r)` [N] with pseudo-Huber d, c = c_mult * sqrt(C*H*W)."""
    dim = out.D_t[0].numel()
    return out.w * pseudo_huber(out.D_t, out.D_r, c_mult * math.sqrt(dim))


# ----------------------------------------------------------------------------------------------
# EDM denoising loss (Karras et al. 2022, eq. 2 / Table 1), for diffusion pretraining

@dataclasses.dataclass(frozen=True)
class EDMLossConfig:
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5


def edm_loss(net: Callable, x_0: torch.Tensor, cfg: EDMLossConfig = EDMLossConfig(),
             class_labels: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample EDM loss [N]: lambda(s) ||D(x_0 + s n, s) - x_0||^2 summed over C, H, W,
    with ln s ~ N(P_mean, P_std^2) and lambda(s) = (s^2 + sd^2) / (s sd)^2."""
    n = x_0.shape[0]
    sigma = (cfg.P_mean + cfg.P_std * torch.randn(n, generator=generator, device=x_0.device)).exp()
    weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
    noise = torch.randn(x_0.shape, generator=generator, device=x_0.device)
    D = net(x_0 + sigma.view(-1, 1, 1, 1) * noise, sigma, class_labels)
    return weight * (D - x_0).square().flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------
# Samplers (docs/method.md section 5.1). Stateless, batched; `noise` is an explicit [N, C, H, W] N(0, I) draw.

def _sigma(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(s), device=x.device, dtype=x.dtype)


@torch.no_grad()
def consistency_sample(net: Callable, noise: torch.Tensor, sigmas: Sequence[float] = (SIGMA_MAX,),
                       sigma_min: float = SIGMA_MIN, class_labels: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None,
                       offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multistep consistency sampling.

    Starts from `x = sigmas[0] * noise` (plus `offset`, e.g. clean images x_0 for the one-step
    denoisings of dFID: x = x_0 + sigma eps). For each sigma s_i: one Euler step of the PF-ODE from s_i
    to sigma_min with the network's denoiser, `x <- x + (x - f(x, s_i)) / s_i * (sigma_min - s_i)`;
    then, if another sigma follows, re-noise to it: `x <- x + sqrt(s_{i+1}^2 - sigma_min^2) n`.
    sigmas=(80,) is 1-step sampling, (80, 0.821) the 2-step sampler of docs/method.md section 5.1.
    """
    sigmas = [float(s) for s in sigmas]
    if any(s <= sigma_min for s in sigmas):
        raise ValueError(f"all sampling sigmas must exceed sigma_min={sigma_min}, got {sigmas}")
    x = noise * sigmas[0] if offset is None else offset + noise * sigmas[0]
    for i, s in enumerate(sigmas):
        D = net(x, _sigma(x, s), class_labels)
        x = x + (x - D) / s * (sigma_min - s)
        if i + 1 < len(sigmas):
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(sigmas[i + 1] ** 2 - sigma_min ** 2) * z
    return x


def sample_1step(net: Callable, noise: torch.Tensor, class_labels=None) -> torch.Tensor:
    return consistency_sample(net, noise, (SIGMA_MAX,), class_labels=class_labels)


def sample_2step(net: Callable, noise: torch.Tensor, class_labels=None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return consistency_sample(net, noise, (SIGMA_MAX, SIGMA_MID), class_labels=class_labels, generator=generator)


def edm_sigmas(num_steps: int = 18, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 time steps, [num_steps + 1] with a final 0."""
    i = torch.arange(num_steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_heun_sample(net: Callable, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = SIGMA_MIN,
                    sigma_max: float = SIGMA_MAX, rho: float = 7.0,
                    class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic EDM sampler (Karras et al. 2022, Algorithm 1; Heun's 2nd order, Euler on the last step)."""
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    x = noise.to(torch.float64) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - net(x.float(), _sigma(x, s).float(), class_labels).double()) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - net(x_next.float(), _sigma(x, s_next).float(), class_labels).double()) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x.float()
