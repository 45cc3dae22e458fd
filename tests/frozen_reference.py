"""A frozen copy of the training step's arithmetic as it was before the speed work (the authors'
arithmetic), kept as the oracle of tests/test_speed.py and as the "today" arm of
benchmarks/step_time.py and benchmarks/gpu_check.py. Do not edit: it is the reference.

What it freezes: the U-Net block's out-of-place residual sums, the consistency forward that asks the
host whether any r > 0 (a sync) and otherwise skips the teacher, the per-parameter EMA loop, and the
loop body that reduces the statistics to Python floats (`.tolist()`, a sync) and checks them before
every update.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ayt import consistency as C
from ayt import networks


def unet_block_forward(self, x, emb):
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
    if self.adaptive_scale:
        scale, shift = params.chunk(chunks=2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
    else:
        x = F.silu(self.norm1(x + params))
    x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
    x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
    if self.num_heads:
        n, c = x.shape[0], x.shape[1]
        q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
        w = networks.attention_weights(q, k)
        a = torch.einsum("nqk,nck->ncq", w, v)
        x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
    return x


def consistency_forward(net, x_0, t, r, eps, class_labels=None, teacher=None, weighting="default"):
    teacher = net if teacher is None else teacher
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    x_t = x_0 + t4 * eps
    x_r = x_0 + r4 * eps
    with torch.random.fork_rng(devices=[x_0.device] if x_0.device.type == "cuda" else []):
        D_t = net(x_t, t, class_labels)
    with torch.no_grad():
        if bool((r > 0).any()):
            D_r = teacher(x_r, r.clamp(min=C.SIGMA_MIN * 1e-3), class_labels)
            D_r = torch.where(r4 > 0, torch.nan_to_num(D_r), x_0)
        else:
            D_r = x_0.clone()
    return C.ConsistencyOutputs(D_t=D_t, D_r=D_r.detach(), t=t, r=r, w=C.ect_weight(t, r, weighting))


@torch.no_grad()
def update_ema(ema, model, decay):
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


@contextlib.contextmanager
def todays_arithmetic():
    """Swap the frozen block forward and consistency forward in (for the duration of the block)."""
    saved = networks.UNetBlock.forward, C.consistency_forward
    networks.UNetBlock.forward, C.consistency_forward = unet_block_forward, consistency_forward
    try:
        yield
    finally:
        networks.UNetBlock.forward, C.consistency_forward = saved


def todays_step(cfg, d, it, model, ema, objective, opt, x_0, labels=None) -> dict:
    """One iteration of the loop as it was (one micro-step, one process), on the frozen arithmetic."""
    from ayt.train import NonFiniteLossError, derive_seed
    with todays_arithmetic():
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * min(1.0, (it + 1) / cfg.optim.warmup_iters) if cfg.optim.warmup_iters else cfg.optim.lr
        opt.zero_grad(set_to_none=True)
        step_seed = derive_seed(cfg.seed, d.rank, it, 0)
        torch.manual_seed(step_seed)
        gen = torch.Generator(d.device).manual_seed(step_seed + 1)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, stats = objective(model, x_0, labels, it, gen, teacher=model)
        loss.float().mean().backward()
        keys = sorted(stats)
        values = dict(zip(keys, torch.stack([stats[k].detach().float().reshape(()) for k in keys]).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(f"non-finite loss at iteration {it}: {values}")
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        update_ema(ema, model, cfg.ema_decay)
    return values


# ----------------------------------------------------------------------------------------------
# Building both steps on one configuration (tests, benchmarks)

def build(preset: str, overrides: dict, device, batch: int, seed: int = 0):
    """(cfg, model, ema, optimiser, {"ECT": objective, "AYT": objective}, x_0) with random weights and a
    random frozen feature net; the same seed gives the same everything."""
    from ayt.augment import AUG_SETS
    from ayt.config import make_config
    from ayt.features import build_feature_net, freeze
    from ayt.losses import MFD
    from ayt.objectives import ConsistencyObjective
    from ayt.runs import build_diffusion_net
    from ayt.train import make_optimizer
    cfg = make_config(preset, {"batch": batch, "device": str(device), **overrides})
    R = cfg.data.resolution
    torch.manual_seed(seed)
    model = build_diffusion_net(cfg, 3, 0).to(device).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = build_diffusion_net(cfg, 3, 0).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = make_optimizer(cfg, model.parameters())
    phi = freeze(build_feature_net(cfg.ct.feature_arch, resolution=R, in_channels=3,
                                   num_outputs=len(AUG_SETS["geo_clr_deg"]))).to(device)
    ct = cfg.ct
    sched = C.TRSchedule(ct.P_mean, ct.P_std, ct.q, ct.k, ct.b, ct.mapping)
    objectives = {"ECT": ConsistencyObjective(sched, "ect"), "AYT": ConsistencyObjective(sched, "mfd", distance=MFD(phi))}
    x_0 = (torch.rand(batch, 3, R, R, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1).to(device)
    return cfg, model, ema, opt, objectives, x_0


def rel_diff(a, b) -> float:
    """max |a - b| / max |b| over flattened tensors (0 when both are 0)."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def compare_steps(preset: str, overrides: dict, device, batch: int, mode: str, iters: int = 2) -> dict:
    """Run `iters` steps of today's path and of the current default (ayt.train.train_step) from the
    same start; relative differences of the loss statistics (every step), the first step's gradients,
    and the weights and EMA after the last step."""
    from ayt.train import Dist, NonFiniteWatch, step_networks, train_step
    d = Dist(device=torch.device(device))
    out = {}
    runs = []
    for which in ("today", "new"):
        cfg, model, ema, opt, objectives, x_0 = build(preset, overrides if which == "new" else
                                                      {k: v for k, v in overrides.items() if k.startswith(("net.", "data.", "ct.", "precision"))},
                                                      device, batch)
        stats, grads = [], None
        for it in range(iters):
            if it == 1:  # gradients of the first step (later ones follow weights that may already differ)
                grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            if which == "today":
                stats.append(todays_step(cfg, d, it, model, ema, objectives[mode], opt, x_0))
            else:
                s = train_step(cfg, d, it, step_networks(cfg, model, model), model, ema, objectives[mode], opt,
                               lambda: (x_0, None), 1, NonFiniteWatch(d.device), check=True)
                stats.append({k: float(v) for k, v in s.items()})
        grads = torch.cat([p.grad.flatten() for p in model.parameters()]) if grads is None else grads
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        emas = torch.cat([p.detach().flatten() for p in ema.parameters()])
        runs.append((stats, grads, params, emas))
    (s0, g0, p0, e0), (s1, g1, p1, e1) = runs
    out["loss_rel"] = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300) for a, b in zip(s0, s1) for k in a)
    out["grad_rel"], out["param_rel"], out["ema_rel"] = rel_diff(g1, g0), rel_diff(p1, p0), rel_diff(e1, e0)
    out["bitwise"] = bool(torch.equal(g0, g1) and torch.equal(p0, p1) and torch.equal(e0, e1)
                          and all(a == b for a, b in zip(s0, s1)))
    return out


def device_parity(device, small: bool = False, time_left=lambda: float("inf")) -> dict:
    """The checks of tests/test_speed.py on any device, at the CIFAR-10 configuration (small: tiny net),
    while time_left() > 0. On a GPU, torch's default RAdam is already the multi-tensor one, so
    `radam_loop` there measures the per-parameter loop against it."""
    preset, over, batch = ("cifar10-ayt", {"net.arch": "tiny", "data.resolution": 16, "ct.feature_arch": "mini-vgg"}, 2) \
        if small else ("cifar10-ayt", {}, 16)
    res = {"config": {"preset": preset, "overrides": over, "batch": batch}}
    checks = [("ECT", "default", {}), ("AYT", "default", {}), ("AYT", "radam_foreach", {"optim.foreach": True}),
              ("AYT", "radam_loop", {"optim.foreach": False}), ("AYT", "channels_last", {"channels_last": True}),
              ("ECT", "channels_last", {"channels_last": True})]
    for mode, name, extra in checks:
        key = f"{mode}_{name}_vs_today"
        res[key] = compare_steps(preset, {**over, **extra}, device, batch, mode) if time_left() > 0 else \
            {"skipped": "section time budget spent"}
    return res
