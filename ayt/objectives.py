"""The three training objectives of the pipeline, one interface for the one training loop.

    objective(net, x_0, labels, it, generator, teacher) -> (per-sample loss [N], stats: dict[str, Tensor])

* `DiffusionObjective`  - EDM denoising loss (diffusion pretraining; Karras et al. 2022).
* `ConsistencyObjective` - ECT (docs/method.md section 2) and the AYT update (section 4), by `mode`:
      ect        w * d(D_t, D_r)                       (pseudo-Huber d, c = c_mult sqrt(dim))
      mfd        direction surrogate with g = unit grad of MFD           (AYT reference default)
      ect+mfd    ect + lam * min(1, (it+1)/ramp) * surrogate(MFD)
      lpips, ect+lpips   the same with LPIPS(VGG) as the distance (baseline)
* `FeatureObjective`   - regression of augmentation labels (docs/method.md section 3.4): MSE per sample.
* `DenoisingObjective` - a denoising autoencoder as feature network (the authors' train_dae.py).

`net` may be a DDP wrapper (it runs the gradient-carrying forward); `teacher` is the bare module.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import consistency as C
from .losses import direction_surrogate, distance_and_direction, ect_mfd_ramp, pseudo_huber


class DiffusionObjective:
    def __init__(self, cfg: C.EDMLossConfig = C.EDMLossConfig()):
        self.cfg = cfg

    def __call__(self, net, x_0, labels, it, generator, teacher=None):
        loss = C.edm_loss(net, x_0, self.cfg, labels, generator)
        return loss, {"loss": loss.detach().mean()}


class ConsistencyObjective:
    """ECT / AYT. `distance` is the frozen per-sample distance (MFD or LPIPS) for the AYT modes."""

    def __init__(self, schedule: C.TRSchedule, mode: str = "mfd", c_mult: float = 0.0,
                 weighting: str = "default", distance: Optional[Callable] = None,
                 lam: float = 1.0, lam_ramp_iters: int = 5000):
        uses_distance = mode not in ("ect",)
        if uses_distance and distance is None:
            raise ValueError(f"mode {mode!r} needs a distance (a frozen feature network)")
        self.schedule, self.mode, self.c_mult, self.weighting = schedule, mode, c_mult, weighting
        self.distance, self.lam, self.lam_ramp_iters = distance, lam, lam_ramp_iters

    def __call__(self, net, x_0, labels, it, generator, teacher=None):
        n = x_0.shape[0]
        t, r = C.sample_t_r(self.schedule, n, it, generator, x_0.device)
        eps = torch.randn(x_0.shape, generator=generator, device=x_0.device)
        out = C.consistency_forward(net, x_0, t, r, eps, labels, teacher=teacher, weighting=self.weighting)
        ect = C.ect_loss(out, self.c_mult)                                    # [N]
        stats = {"loss_ect": ect.detach().mean()}
        if self.mode == "ect":
            return ect, stats
        # d [N] (logged) and the unit-norm direction g [N, C, H, W] from one forward/backward of phi
        d, g = distance_and_direction(self.distance, out.D_t.float(), out.D_r.float())
        surrogate = direction_surrogate(out.D_t, g.to(out.D_t.dtype), out.w)  # [N]
        stats["distance"] = d.mean()
        if self.mode in ("mfd", "lpips"):
            return surrogate, stats
        return ect + self.lam * ect_mfd_ramp(it, self.lam_ramp_iters) * surrogate, stats


class FeatureObjective:
    """Regress the labels of random augmentations (docs/method.md section 3.4); p ramps linearly from 0."""

    def __init__(self, pipe, p: float, p_ramp_iters: int):
        self.pipe, self.p, self.p_ramp_iters = pipe, p, p_ramp_iters

    def __call__(self, net, x_0, labels, it, generator, teacher=None):
        from .augment import ramped_p
        self.pipe.p = ramped_p(self.p, it, self.p_ramp_iters)
        x_aug, y = self.pipe(x_0, generator=generator)          # [N, C, H, W], [N, L]
        pred = net(x_aug)                                       # [N, L]
        loss = (pred.float() - y).square().mean(1)
        return loss, {"loss": loss.detach().mean()}


class DenoisingObjective:
    """Denoising-autoencoder training (1202kbs/AYT scripts/train_ae/train_dae.py): per sample
    sigma ~ U(0, sigma_max), x_s = x_0 + sigma eps, loss pseudo_huber(net(x_s), x_0) with c = c_mult sqrt(dim)
    (c = 0, the authors' setting: the L2 norm of the reconstruction error). Returns [N]."""

    def __init__(self, sigma_max: float = 1.0, c_mult: float = 0.0):
        self.sigma_max, self.c_mult = sigma_max, c_mult

    def __call__(self, net, x_0, labels, it, generator, teacher=None):
        n = x_0.shape[0]
        sigma = self.sigma_max * torch.rand(n, generator=generator, device=x_0.device)      # [N]
        eps = torch.randn(x_0.shape, generator=generator, device=x_0.device)
        pred = net(x_0 + sigma.view(-1, *([1] * (x_0.ndim - 1))) * eps)                   # [N, C, H, W]
        loss = pseudo_huber(pred.float(), x_0, self.c_mult * math.sqrt(x_0[0].numel()))
        return loss, {"loss": loss.detach().mean()}
